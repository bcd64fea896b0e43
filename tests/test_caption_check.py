"""The caption check of teacher generation: counted exactly, rejected samples dropped and not drawn again."""

from __future__ import annotations

import json
import shutil

import pytest
import webdataset as wds

from ddstrans.cli.main import main

CAPTIONS = ["a red circle on a striped background", "a blue square on a checkered background"]


def _keys(out):
    return sorted(s["__key__"] for tar in sorted(out.glob("shards-*.tar"))
                  for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))


def _forced(verdicts: dict):
    """A reader whose verdict is a function of the prompt alone (so the counts are known in advance)."""
    calls = []

    def check(images, prompts):
        calls.append(len(prompts))
        assert images.shape[0] == len(prompts) and images.min() >= -1 and images.max() <= 1
        return [verdicts[p] for p in prompts]

    check.calls = calls
    return check


@pytest.fixture
def teacher(tiny_pixel_teacher_dir, tmp_path):
    from ddstrans.teacher import Teacher

    return Teacher.from_pretrained(tiny_pixel_teacher_dir, cache_dir=tmp_path / "cache")


def test_counts_drop_and_resume(teacher, tmp_path):
    from ddstrans.data.writer import write_from_teacher

    check = _forced({CAPTIONS[0]: True, CAPTIONS[1]: False})
    out = tmp_path / "gen"
    kw = dict(num_inference_steps=2, batch_size=2, progress=False, check=check, drop_rejected=True)
    m = write_from_teacher(out, teacher, CAPTIONS, 5, **kw)
    assert (m["caption_check"]["checked"], m["caption_check"]["accepted"]) == (5, 3)
    assert m["count"] == 3 and _keys(out) == ["00000000", "00000002", "00000004"]
    assert m["caption_check"]["rejected_indices"] == [[1, 2], [3, 4]]
    assert sum(m["skipped"].values()) == 2
    # resuming to 7 draws only samples 5 and 6: the rejected ones are not drawn again
    m = write_from_teacher(out, teacher, CAPTIONS, 7, **kw)
    assert check.calls[-1] == 2
    assert (m["caption_check"]["checked"], m["caption_check"]["accepted"], m["count"]) == (7, 4, 4)
    assert _keys(out) == ["00000000", "00000002", "00000004", "00000006"]


def test_without_drop_every_sample_is_written_and_counted(teacher, tmp_path):
    from ddstrans.data.writer import write_from_teacher

    check = _forced({CAPTIONS[0]: False, CAPTIONS[1]: False})
    m = write_from_teacher(tmp_path / "g", teacher, CAPTIONS, 4, num_inference_steps=2, batch_size=3,
                           progress=False, check=check)
    assert (m["caption_check"]["checked"], m["caption_check"]["accepted"], m["count"]) == (4, 0, 4)
    with pytest.raises(ValueError, match="drop_rejected needs check"):
        write_from_teacher(tmp_path / "h", teacher, CAPTIONS, 1, progress=False, drop_rejected=True)


@pytest.fixture
def shapes_like_teacher_dir(tiny_pixel_teacher_dir, tmp_path):
    """The tiny pixel teacher dressed as a shapes-world teacher (model_index.json's class), with fast settings."""
    root = tmp_path / "shapes-like"
    shutil.copytree(tiny_pixel_teacher_dir, root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ShapesTeacher"}))
    (root / "ddstrans_settings.json").write_text(json.dumps({"sampling": {"num_inference_steps": 2}}))
    return root


def _cli(out, teacher_dir, *extra):
    return main(["make-shards", "from-teacher", str(out), "--teacher", str(teacher_dir), *extra,
                 "--count", "4", "--device", "cpu", "--no-progress"])


def test_cli_filters_by_default_for_the_shapes_teacher(shapes_like_teacher_dir, tmp_path, monkeypatch, capsys):
    import ddstrans.shapes.sampling_eval as S

    monkeypatch.setattr(S, "matches_caption", _forced({CAPTIONS[0]: True, CAPTIONS[1]: False}))
    prompts = [w for c in CAPTIONS for w in ("--prompt", c)]
    assert _cli(tmp_path / "a", shapes_like_teacher_dir, *prompts) == 0
    assert "caption check: 2 of 4 samples (50.0%) match their caption; 2 dropped" in capsys.readouterr().out
    assert _keys(tmp_path / "a") == ["00000000", "00000002"]
    assert _cli(tmp_path / "b", shapes_like_teacher_dir, *prompts, "--no-filter") == 0
    assert "caption check: 2 of 4 samples (50.0%) match their caption\n" in capsys.readouterr().out
    assert len(_keys(tmp_path / "b")) == 4


def test_cli_filter_needs_shapes_captions(tiny_pixel_teacher_dir, tmp_path, capsys):
    assert _cli(tmp_path / "c", tiny_pixel_teacher_dir, "--prompt", "a photo of a cat") == 0  # not shapes: no check
    assert "caption check" not in capsys.readouterr().out
    assert _cli(tmp_path / "d", tiny_pixel_teacher_dir, "--prompt", "a photo of a cat", "--filter") != 0
    assert "--filter reads shapes-world captions only" in capsys.readouterr().err


def test_the_shapes_reader_accepts_renders_of_their_caption_only():
    from ddstrans.shapes.sampling_eval import matches_caption
    from ddstrans.shapes.world import render_batch, sample_scene, to_model

    seeds = list(range(8))
    imgs, _, caps = render_batch(seeds)
    x = to_model(imgs)
    assert matches_caption(x, caps) == [True] * 8
    wrong = [sample_scene(s, color="red" if sample_scene(s).color != "red" else "blue").caption for s in seeds]
    assert matches_caption(x, wrong) == [False] * 8
