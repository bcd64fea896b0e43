"""scripts/diagnose_sampling.py draws the model card's samples (eval_shapes_teacher's) and varies only the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEACHER = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-teacher"


@pytest.mark.slow
def test_defaults_match_the_cards_sampling_eval_and_a_guidance_interval_changes_it(load_script, tmp_path):
    from ddstrans.teacher import Teacher

    diag, card = load_script("diagnose_sampling"), load_script("eval_shapes_teacher")
    common = ["--teacher", str(TEACHER), "--seed", "3"]
    diag.main([*common, "--n", "2", "--steps", "3", "--json", str(tmp_path / "a.json")])
    ours = json.loads((tmp_path / "a.json").read_text())
    theirs = card.eval_sampling(Teacher.from_pretrained(TEACHER), card.parse_args(
        [*common, "--sample-n", "2", "--sample-steps", "3"]))
    assert [r["caption"] for r in ours["rows"]] == [r["caption"] for r in theirs]
    assert [r["color_and_shape"] for r in ours["rows"]] == [r["color_and_shape"] for r in theirs]
    s = ours["summary"]
    assert s["captions"] == 24 and s["misses"] == round(sum(2 * (1 - r["color_and_shape"]) for r in theirs))

    # guidance 0 at every timestep >= 0 samples unconditionally: the captions' colors are no longer followed
    diag.main([*common, "--n", "2", "--steps", "3", "--guidance-high", "0", "--high-t", "0",
               "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["summary"]["overall"] < s["overall"]


def test_split_at_high_t_gives_the_high_value_from_the_split_on(load_script):
    split = load_script("diagnose_sampling").split_at_high_t
    assert split(2.0, None, 500) == 2.0  # no high value: the constant
    f = split(0.0, 1.0, 500)
    assert [f(t) for t in (0, 499, 500, 999)] == [0.0, 0.0, 1.0, 1.0]
