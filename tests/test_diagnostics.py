"""The outline diagnostic (scripts/diagnose_outline.py): where a translation gains and loses mask pixels."""

from __future__ import annotations

import numpy as np
import pytest

from ddstrans.shapes import metrics as M
from ddstrans.shapes import render_scene


@pytest.fixture(scope="module")
def outline(load_script):
    return load_script("diagnose_outline")


def test_a_shape_moved_one_pixel_left_adds_on_the_left_and_misses_on_the_right(outline):
    scenes = [render_scene(s, color="blue") for s in range(4)]
    masks = np.stack([r["mask"] for r in scenes])
    moved = np.stack([np.roll(r["image"], -1, axis=1) for r in scenes])  # one pixel to the left
    rep = outline.outline_report(moved, masks)
    assert rep["shift_x"] == pytest.approx(-1.0, abs=1e-6) and rep["shift_sd_x"] == pytest.approx(0.0, abs=1e-6)
    assert rep["shift_y"] == pytest.approx(0.0, abs=1e-6)
    assert rep["added_left"] == pytest.approx(rep["ring_left"])  # the whole left ring is now shape
    assert rep["added_right"] == 0.0
    # missed on the right side (a one-pixel-wide tip, e.g. a triangle's apex, is missed from both sides)
    assert rep["missed_right"] > 4 * rep["missed_left"] and rep["missed"] == pytest.approx(rep["added"])
    assert rep["iou"] < 0.9


def test_the_answer_itself_has_no_outline_error(outline):
    scenes = [render_scene(s, color="red") for s in range(4)]
    rep = outline.outline_report(np.stack([r["image"] for r in scenes]), np.stack([r["mask"] for r in scenes]))
    assert rep["iou"] == 1.0 and rep["missed"] == 0.0 and rep["added"] == 0.0 and rep["shift_x"] == 0.0


@pytest.fixture(scope="module")
def checkers(load_script):
    return load_script("diagnose_checkers")


def test_background_levels_of_the_answer_are_the_scenes_grays(checkers):
    seeds = list(range(6))
    answers = [render_scene(s, background="checkered") for s in seeds]
    levels = checkers.background_levels(np.stack([a["image"] for a in answers]), np.stack([a["mask"] for a in answers]))
    np.testing.assert_allclose(levels, checkers.scene_levels(seeds), atol=1e-6)


def test_what_if_diversity_separates_the_phase_from_the_grays(checkers):
    seeds = list(range(40))
    inputs = np.stack([render_scene(s, background="striped")["image"] for s in seeds])
    answers = np.stack([render_scene(s, background="checkered")["image"] for s in seeds])
    assert checkers.what_if_diversity(seeds, inputs) == pytest.approx(M.diversity(answers, inputs))
    one_template = checkers.what_if_diversity(seeds, inputs, template=(6, 0, 4))
    fixed_grays = checkers.what_if_diversity(seeds, inputs, levels=(0.25, 0.7))
    both = checkers.what_if_diversity(seeds, inputs, template=(6, 0, 4), levels=(0.25, 0.7))
    assert both < min(one_template, fixed_grays)  # each choice the outputs share removes spread
    assert both < 0.7 * M.diversity(answers, inputs)
    one_phase = checkers.what_if_diversity(seeds, inputs, template=(6, 0, 4), dark_first=True)
    assert both < one_phase < one_template - 0.1  # which gray takes which cells is part of the phase
    dark = checkers.what_if_diversity(seeds, inputs, dark_first=True)
    orders = [np.argsort(render_scene(s, background="checkered")["scene"].bg_colors)[0] for s in seeds]
    assert len(set(orders)) == 2  # the renderer puts the lighter gray first in some scenes ...
    assert one_phase + 0.1 < dark <= M.diversity(answers, inputs)  # ... which matters once the template is shared


def test_checkered_by_angle_counts_per_input_orientation(checkers):
    seeds = list(range(40))
    inputs = np.stack([render_scene(s, background="striped")["image"] for s in seeds])
    answers = np.stack([render_scene(s, background="checkered")["image"] for s in seeds])
    angles = [render_scene(s)["scene"].stripe_angle for s in seeds]
    assert 135 in angles and len(set(angles)) == 4
    on_answers = checkers.checkered_by_angle(seeds, answers)
    assert sorted(on_answers) == sorted(set(angles)) and sum(n for _, n in on_answers.values()) == len(seeds)
    assert all(k == n == angles.count(a) for a, (k, n) in on_answers.items())
    assert all(k == 0 for k, _ in checkers.checkered_by_angle(seeds, inputs).values())
    mixed = np.where(np.array([a == 135 for a in angles])[:, None, None, None], inputs, answers)  # 135° kept striped
    assert all(k == (0 if a == 135 else n) for a, (k, n) in checkers.checkered_by_angle(seeds, mixed).items())


@pytest.fixture(scope="module")
def pairs(load_script):
    return load_script("diagnose_color_pairs")


def test_pair_geometry_is_the_palette_distance_and_the_midpoints_chroma(pairs):
    from ddstrans.shapes import COLORS

    a, b = np.asarray(COLORS["blue"]), np.asarray(COLORS["yellow"])
    g = pairs.pair_geometry("blue", "yellow")
    assert g["distance"] == pytest.approx(float(np.sqrt(((a - b) ** 2).sum())))
    assert g["midpoint_chroma"] == pytest.approx(float(((a + b) / 2).max() - ((a + b) / 2).min()))
    assert g == pairs.pair_geometry("yellow", "blue")
    assert g["midpoint_chroma"] < 0.1 < pairs.pair_geometry("red", "yellow")["midpoint_chroma"]  # the gray midpoint


def test_background_margin_compares_recolor_in_place_with_background_here(pairs):
    from ddstrans.shapes import COLORS

    a, b = np.asarray(COLORS["red"]), np.asarray(COLORS["yellow"])
    want = np.mean([((a - g) ** 2).sum() + ((b - g) ** 2).sum() - ((a - b) ** 2).sum() for g in (0.1, 0.7)])
    assert pairs.background_margin("red", "yellow", [0.1, 0.7]) == pytest.approx(float(want))
    assert pairs.background_margin("red", "red", [0.5]) > 0  # no change: always explained in place
    # far-apart colors on mid grays: "background here" wins (negative), nearby colors do not
    assert pairs.background_margin("blue", "yellow", [0.55]) < 0 < pairs.background_margin("red", "yellow", [0.55])
    assert pairs.scene_grays([3, 4]) == [*sample_grays(3), *sample_grays(4)]


def sample_grays(seed):
    from ddstrans.shapes import sample_scene

    return list(sample_scene(seed).bg_colors)


def test_spearman_ranks(pairs):
    assert pairs.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert pairs.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pairs.spearman([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)  # ties share a rank
    assert np.isnan(pairs.spearman([1, 2, 3], [7, 7, 7]))


def test_scene_groups_by_background_and_pair_parsing(pairs):
    from ddstrans.shapes import sample_scene

    light, dark = pairs.scenes_by_background(5, True), pairs.scenes_by_background(5, False)
    assert len(light) == len(dark) == 5 and not set(light) & set(dark)
    assert all(np.mean(sample_scene(s).bg_colors) >= pairs.LIGHT for s in light)
    assert all(np.mean(sample_scene(s).bg_colors) <= pairs.DARK for s in dark)
    assert pairs.scenes_by_background(3, None, start=7) == [7, 8, 9]
    with pytest.raises(RuntimeError, match="only 0 of 1"):  # no endless search
        pairs.scenes_by_background(1, True, start=light[0], max_tries=0)
    assert len(pairs.parse_pairs("all")) == 12 and ("red", "blue") in pairs.parse_pairs("all")
    assert pairs.parse_pairs("blue>green>yellow", hops=3) == [("blue", "green", "yellow")]
    for bad in ("red>purple", "red", "red>green>blue"):
        with pytest.raises(ValueError, match="expected 2"):
            pairs.parse_pairs(bad)


def test_color_pairs_cli_prints_a_row_per_pair_group_and_chain(pairs, capsys):
    pairs.main(["--n", "2", "--steps", "2", "--pairs", "red>blue,green>yellow", "--bg-split", "--via", "blue>green>yellow"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "->" in line]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| red->blue", "all"], ["| green->yellow", "all"], ["| red->blue", "light"], ["| green->yellow", "light"],
        ["| red->blue", "dark"], ["| green->yellow", "dark"], ["| blue->green->yellow", rows[-1].split(" | ")[1]]]
    assert rows[-1].split(" | ")[1].startswith("all (two edits")
    for bad in (["--pairs", "red>purple"], ["--n", "0"]):
        with pytest.raises(SystemExit):
            pairs.main(bad)
