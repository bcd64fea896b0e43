"""Shapes-world evaluation: held-out inputs, ground-truth scoring, the ``ddstrans eval`` table."""

from __future__ import annotations

import json

import numpy as np

from ddstrans.cli.main import main
from ddstrans.shapes import parse_caption, render_scene, to_model
from ddstrans.shapes.defaults import shapes_tasks
from ddstrans.shapes.evaluation import build_eval_set, evaluate, format_table, score
from ddstrans.shapes.seeds import HELD_OUT

TASKS = {t.name: t for t in shapes_tasks()}


def test_eval_set_is_held_out_and_excludes_inputs_already_at_target():
    es = build_eval_set(TASKS["to_blue"], 12)
    assert es.attribute == "color" and len(es.seeds) == 12
    assert all(s in HELD_OUT for s in es.seeds)
    assert all(parse_caption(c)["color"] != "blue" for c in es.src_captions)
    assert es.targets == ["blue"] * 12
    es_shape = build_eval_set(TASKS["to_square"], 6)
    assert es_shape.attribute == "shape"
    # the target mask of a shape change is the square's, not the input's
    assert not np.array_equal(es_shape.tgt_masks, es_shape.src_masks)


def test_identity_scores_zero_accuracy_and_full_iou():
    rows = evaluate([TASKS["to_blue"], TASKS["to_checkered"]], 8, methods=["identity"])
    for r in rows:
        assert r["target_acc"] == 0.0 and r["diversity"] == 1.0
    assert rows[0]["mask_iou"] == 1.0
    assert "| to_blue | identity | 8 | 0.000 | 1.000 |" in format_table(rows)


def test_a_perfect_edit_scores_full_accuracy():
    for name in ("to_blue", "to_square", "to_checkered"):
        es = build_eval_set(TASKS[name], 8)
        perfect = to_model(np.stack([render_scene(s, **{es.attribute: v})["image"] for s, v in zip(es.seeds, es.targets)]))
        assert np.array_equal(es.answers.numpy(), perfect.numpy())  # the eval set carries the renderer's answers
        m = score(es, perfect)
        assert m["target_acc"] == 1.0, name
        assert m["mask_iou"] > 0.99, name


def test_the_answer_method_scores_what_a_perfect_translation_keeps():
    """Method "answer" (the ground-truth edit) calibrates the table: full accuracy and IoU, and the diversity a
    perfect translation keeps (about the inputs' for these tasks: the renderer draws each checkerboard at random)."""
    rows = evaluate([TASKS["to_blue"], TASKS["to_checkered"]], 16, methods=["answer", "identity"])
    answer = [r for r in rows if r["method"] == "answer"]
    assert [r["task"] for r in answer] == ["to_blue", "to_checkered"]
    for r in answer:
        assert r["target_acc"] == 1.0 and r["mask_iou"] > 0.99
        assert 0.85 < r["diversity"] < 1.15


def test_eval_cli_identity_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["eval", "--methods", "identity", "--n", "4", "--tasks", "to_red,to_square", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| to_red | identity | 4 |" in table and "| to_square | identity | 4 |" in table
    assert [r["task"] for r in json.loads(out.read_text())] == ["to_red", "to_square"]
    assert main(["eval", "--methods", "network", "--n", "4"]) == 1  # needs a translator
    assert main(["eval", "--methods", "identity", "--tasks", "nope"]) == 1


def test_color_pair_tasks_change_only_their_source_color():
    import pytest

    from ddstrans.shapes.defaults import color_pair_task, shapes_task

    task = shapes_task("red_to_yellow")
    assert task.target_for("a red circle on a striped background") == "a yellow circle on a striped background"
    assert task.target_for("a blue circle on a striped background") == "a blue circle on a striped background"
    es = build_eval_set(task, 6)
    assert all(parse_caption(c)["color"] == "red" for c in es.src_captions) and es.targets == ["yellow"] * 6
    assert shapes_task("to_square").name == "to_square"
    for bad in ("purple_to_red", "red_to_red", "nope"):
        with pytest.raises(ValueError):
            shapes_task(bad)
    assert color_pair_task("blue", "green").name == "blue_to_green"


def test_eval_cli_takes_color_pairs_for_per_image_methods(capsys):
    assert main(["eval", "--methods", "identity", "--n", "3", "--tasks", "green_to_blue"]) == 0
    assert "| green_to_blue | identity | 3 |" in capsys.readouterr().out
    assert main(["eval", "--methods", "identity", "--tasks", "purple_to_red"]) == 1


def test_a_composition_changes_two_attributes_and_scores_both():
    """``to_blue+to_square`` applies both rewrites; its inputs are scenes it changes in both (no blue input, no
    square), its answer renders both changes, and half an edit (only the color) scores no accuracy."""
    from ddstrans.shapes.defaults import shapes_task

    task = shapes_task("to_blue+to_square")
    assert task.target_for("a red circle on a striped background") == "a blue square on a striped background"
    es = build_eval_set(task, 8)
    assert es.attribute == "color+shape" and es.targets == ["blue+square"] * 8
    assert all(parse_caption(c)["color"] != "blue" and parse_caption(c)["shape"] != "square" for c in es.src_captions)
    assert score(es, es.answers)["target_acc"] == 1.0
    color_only = to_model(np.stack([render_scene(s, color="blue")["image"] for s in es.seeds]))
    half = score(es, color_only)
    assert half["target_acc"] == 0.0 and half["color_acc"] == 1.0 and half["shape_acc"] == 0.0
    assert score(es, es.inputs)["keep_psnr"] == 100.0  # the background outside both masks is kept


def test_a_color_and_background_composition_has_nothing_to_keep():
    from ddstrans.shapes.defaults import shapes_task

    rows = evaluate([shapes_task("red_to_blue+to_checkered")], 8, methods=["answer", "identity"])
    assert [r["target_acc"] for r in rows] == [1.0, 0.0]
    assert all(r["keep_psnr"] != r["keep_psnr"] for r in rows)  # NaN: every pixel is asked to change
    assert "| red_to_blue+to_checkered | answer | 8 | 1.000 |" in format_table(rows) and "| — |" in format_table(rows)


def test_bad_compositions_are_refused_with_the_task_name():
    import pytest

    from ddstrans.shapes.defaults import shapes_task

    with pytest.raises(ValueError, match="to_blue\\+"):
        shapes_task("to_blue+")
    with pytest.raises(ValueError, match="unknown shapes task 'to_purple'"):
        shapes_task("to_blue+to_purple")


def test_a_second_held_out_set_starts_at_the_offset():
    """``held_out_offset`` (``ddstrans eval --held-out-offset``) scores other held-out scenes: a checkpoint chosen on
    the usual set can be checked on inputs that played no part in the choice."""
    task, k = TASKS["to_square"], 1_000_000
    usual, second = {}, {}
    evaluate([task], 4, methods=["identity"], examples=usual)
    evaluate([task], 4, methods=["identity"], examples=second, held_out_offset=k)
    expected = build_eval_set(task, 4, start_seed=HELD_OUT.start + k)
    assert min(expected.seeds) >= HELD_OUT.start + k
    assert np.array_equal(second["to_square"][0].numpy(), expected.inputs[:4].numpy())
    assert not np.array_equal(second["to_square"][0].numpy(), usual["to_square"][0].numpy())
    assert main(["eval", "--methods", "identity", "--n", "2", "--tasks", "to_red", "--held-out-offset", "1000"]) == 0
    assert main(["eval", "--methods", "identity", "--held-out-offset", str(len(HELD_OUT))]) == 1


def test_validation_inputs_are_the_ones_training_validates_on(tmp_path, capsys):
    """``ddstrans eval --validation`` scores the inputs training's ShapesMetrics logs (``seeds.VALIDATION``), so a
    checkpoint can be chosen there and reported on the held-out inputs it was not chosen on."""
    import pytest

    from ddstrans.shapes.seeds import VALIDATION

    task = TASKS["to_square"]
    val = {}
    evaluate([task], 4, methods=["identity"], examples=val, seed_range=VALIDATION)
    expected = build_eval_set(task, 4, seed_range=VALIDATION)
    assert np.array_equal(val["to_square"][0].numpy(), expected.inputs[:4].numpy())
    out = tmp_path / "val.json"
    assert main(["eval", "--validation", "--methods", "identity", "--n", "4", "--tasks", "to_square",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    held_out = evaluate([task], 4, methods=["identity"])[0]
    assert row["mask_iou"] == pytest.approx(score(expected, expected.inputs)["mask_iou"])
    assert row["mask_iou"] != pytest.approx(held_out["mask_iou"])  # other scenes, other square-vs-input overlap
    capsys.readouterr()
    assert main(["eval", "--validation", "--methods", "identity", "--held-out-offset", str(len(VALIDATION))]) == 1
    assert "with --validation" in capsys.readouterr().err


def test_eval_sets_from_the_training_range():
    """``seed_range=seeds.TRANSLATOR_TRAIN`` builds the same kind of set from a translator's training scenes (probes
    of what it was trained on); a set that would run out of its range is refused, naming it."""
    import pytest

    from ddstrans.shapes.seeds import TRANSLATOR_TRAIN

    task = TASKS["to_square"]
    train = build_eval_set(task, 4, seed_range=TRANSLATOR_TRAIN)
    assert all(s in TRANSLATOR_TRAIN for s in train.seeds) and train.targets == ["square"] * 4
    with pytest.raises(ValueError, match="leaves seed_range seeds.TRANSLATOR_TRAIN before 4 inputs"):
        build_eval_set(task, 4, start_seed=TRANSLATOR_TRAIN.stop - 2, seed_range=TRANSLATOR_TRAIN)
    with pytest.raises(ValueError, match="leaves seed_range seeds.HELD_OUT"):  # the default range is the held-out one
        build_eval_set(task, 4, start_seed=TRANSLATOR_TRAIN.start)
