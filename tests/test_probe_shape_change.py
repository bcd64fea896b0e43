"""scripts/probe_shape_change.py's ``edit`` probe started at a translator's outputs (``--translator``)."""

from __future__ import annotations


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the probe's output by their first cell."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_edit_starts_at_the_translators_outputs(load_script, shapes_translator_dir, capsys):
    probe = load_script("probe_shape_change")
    args = ["edit", "--guidance", "1.5", "--schedules", "eval", "--n", "4", "--steps", "1", "--lr", "1e-9"]
    probe.main([*args[:4], "eval,5-50", *args[5:], "--translator", str(shapes_translator_dir), "--by-shape"])
    started = _rows(capsys.readouterr().out)
    probe.main(args)
    from_input = _rows(capsys.readouterr().out)

    edit = "DDS edit, guidance 1.5, t (50, 600)"
    # a vanishing step leaves the edit where it started: at the translator's outputs, or at the inputs
    assert started[f"{edit}, from the translator's outputs"] == started["translator"]
    assert started["DDS edit, guidance 1.5, t (5, 50), from the translator's outputs"] == started["translator"]  # A-B
    assert from_input[edit] != started["translator"]
    assert from_input[edit][2] == "0.000"  # the inputs are circles and triangles: no square among them
    # one row per source shape, whose counts add up to the whole set
    n = [int(started[f"translator, {s}"][0]) for s in ("circles", "triangles")]
    assert sum(n) == int(started["translator"][0]) == 4


def test_edit_on_a_second_held_out_set(load_script, shapes_translator_dir, capsys):
    """``--held-out-offset`` scores the inputs ``ddstrans eval --held-out-offset`` scores: the translator's row equals
    the evaluation's on the same offset, and differs from the usual set's."""
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import evaluate
    from ddstrans.translator import Translator

    probe = load_script("probe_shape_change")
    args = ["edit", "--guidance", "1.5", "--schedules", "eval", "--n", "6", "--steps", "1",
            "--translator", str(shapes_translator_dir)]
    probe.main([*args, "--held-out-offset", "1000"])
    second = _rows(capsys.readouterr().out)["translator"]
    (ref,) = evaluate([shapes_task("to_square")], 6, ["network"],
                      translator=Translator.from_pretrained(shapes_translator_dir), held_out_offset=1000)
    assert second[2:4] == [f"{ref['target_acc']:.3f}", f"{ref['mask_iou']:.3f}"]
    assert second[4] == f"{ref['keep_psnr']:.2f}"
    probe.main(args)
    assert _rows(capsys.readouterr().out)["translator"][3:5] != second[3:5]


def test_distill_fits_the_translator_in_place(load_script, shapes_translator_dir, capsys):
    """``distill`` scores the translator on its training scenes and two held-out sets, before and after fitting it
    to the refined pairs; a vanishing learning rate leaves every score as it was, a large one moves them."""
    probe = load_script("probe_shape_change")
    args = ["distill", "--translator", str(shapes_translator_dir), "--guidance", "1.5", "--n", "4", "--other-n", "4",
            "--steps", "1", "--fit-steps", "2"]
    probe.main([*args, "--fit-lr", "1e-12"])
    rows = _rows(capsys.readouterr().out)
    assert rows["fitted to 4 pairs, 2 steps, lr 1e-12"] == rows["translator"]
    assert rows["refined by DDS, guidance 1.5 (the pairs' targets)"][1:] == ["-", "-"]
    probe.main([*args, "--fit-lr", "1e-2"])
    rows = _rows(capsys.readouterr().out)
    assert rows["fitted to 4 pairs, 2 steps, lr 0.01"] != rows["translator"]
    import pytest

    # the fixture's translator draws no square, so none of its refined targets is one: nothing to fit

    with pytest.raises(SystemExit, match="none of the 4 refined targets reads as a square"):
        probe.main([*args, "--only-squares"])


def test_distill_keeps_and_reuses_its_refined_pairs(load_script, shapes_translator_dir, tmp_path, capsys):
    """``--pairs FILE`` keeps the refined pairs per scene: the same scenes and settings reuse them (same targets, same
    table), a larger ``--n`` refines only the new scenes, other settings refine anew."""
    probe = load_script("probe_shape_change")
    pairs = tmp_path / "pairs.pt"
    args = ["distill", "--translator", str(shapes_translator_dir), "--guidance", "1.5", "--other-n", "4",
            "--steps", "1", "--fit-steps", "1", "--pairs", str(pairs)]
    probe.main([*args, "--n", "4"])
    first = capsys.readouterr().out
    assert "0 reused, 4 to refine" in first
    saved = pairs.read_bytes()
    probe.main([*args, "--n", "4"])
    second = capsys.readouterr().out
    assert "4 reused, 0 to refine" in second
    assert _rows(second) == _rows(first)
    assert pairs.read_bytes() == saved
    probe.main([*args, "--n", "6"])
    assert "4 reused, 2 to refine" in capsys.readouterr().out
    probe.main([*args, "--n", "6", "--lr", "0.5"])
    assert "refining anew" in capsys.readouterr().out
    probe.main([*args, "--n", "6", "--refine-t-range", "20-300"])
    assert "refining anew" in capsys.readouterr().out


def test_distill_saves_the_fitted_translator(load_script, shapes_translator_dir, tmp_path, capsys):
    """``--save DIR`` writes the fitted translator as a verified export that scores as the fitted row does."""
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import evaluate
    from ddstrans.translator import Translator

    probe = load_script("probe_shape_change")
    out = tmp_path / "fitted"
    args = ["distill", "--translator", str(shapes_translator_dir), "--guidance", "1.5", "--n", "4", "--other-n", "4",
            "--steps", "1", "--fit-steps", "2", "--fit-lr", "1e-2", "--save", str(out)]
    probe.main(args)
    rows = _rows(capsys.readouterr().out)
    fitted, before = rows["fitted to 4 pairs, 2 steps, lr 0.01"], rows["translator"]
    tr = Translator.from_pretrained(out)  # verifies every file's hash
    assert tr.info["fitted"]["steps"] == 2
    (m,) = evaluate([shapes_task("to_square")], 64, ["network"], translator=tr)
    assert fitted[1] == f"{m['target_acc']:.3f} / {m['mask_iou']:.3f} / {m['keep_psnr']:.2f}" != before[1]
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit, match="exists"):  # refused before any work, not after the fit
        probe.main(args)
    assert "refined pairs" not in capsys.readouterr().out


def test_edit_in_the_late_range(load_script, shapes_translator_dir, capsys):
    """``--schedules late`` edits in [20, 300); a vanishing step leaves the translator's outputs as they were."""
    probe = load_script("probe_shape_change")
    probe.main(["edit", "--guidance", "1.5", "--schedules", "late", "--n", "4", "--steps", "1", "--lr", "1e-9",
                "--translator", str(shapes_translator_dir)])
    rows = _rows(capsys.readouterr().out)
    assert rows["DDS edit, guidance 1.5, t (20, 300), from the translator's outputs"] == rows["translator"]


def test_mirror_half_mirrors_the_same_rows_of_every_tensor(load_script):
    """The fit's mirroring keeps pairs aligned: a row mirrored in the inputs is mirrored in the targets, the
    others are untouched, and both kinds occur."""
    import torch

    probe = load_script("probe_shape_change")
    x = torch.randn(64, 3, 8, 8)
    y = x * 2 + 1  # a per-pixel function of x: it commutes with mirroring only if both are mirrored alike
    mx, my = probe.mirror_half(torch.Generator().manual_seed(0), x, y)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(mx, x)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(mx, x)])
    assert (flipped | kept).all() and flipped.any() and kept.any()
    assert torch.equal(my, mx * 2 + 1)
    again, _ = probe.mirror_half(torch.Generator().manual_seed(0), x, y)
    assert torch.equal(again, mx)  # one generator, one draw: a fit is reproducible


def test_distill_with_mirrored_batches(load_script, shapes_translator_dir, capsys):
    """``--fit-mirror`` labels its row and fits: a large learning rate moves the scores."""
    probe = load_script("probe_shape_change")
    probe.main(["distill", "--translator", str(shapes_translator_dir), "--guidance", "1.5", "--n", "4",
                "--other-n", "4", "--steps", "1", "--fit-steps", "2", "--fit-lr", "1e-2", "--fit-mirror"])
    rows = _rows(capsys.readouterr().out)
    assert rows["fitted to 4 pairs, 2 steps, lr 0.01, mirrored at random"] != rows["translator"]


def test_distill_with_the_absolute_error(load_script, shapes_translator_dir, capsys):
    """``--fit-loss l1`` fits with the absolute error: from the same pairs, steps and learning rate it lands
    elsewhere than the squared error, and its row says which loss it used."""
    probe = load_script("probe_shape_change")
    args = ["distill", "--translator", str(shapes_translator_dir), "--guidance", "1.5", "--n", "4", "--other-n", "4",
            "--steps", "1", "--fit-steps", "2", "--fit-lr", "1e-2"]
    probe.main(args)
    squared = _rows(capsys.readouterr().out)["fitted to 4 pairs, 2 steps, lr 0.01"]
    probe.main([*args, "--fit-loss", "l1"])
    rows = _rows(capsys.readouterr().out)
    absolute = rows["fitted to 4 pairs, 2 steps, lr 0.01, l1 loss"]
    assert absolute != rows["translator"] and absolute != squared


def test_half_colored_counts_pixels_between_gray_and_color(load_script):
    """A render has no half-colored pixel; a side drawn at half the color's strength adds its pixels, and only
    those (a gray background and a full color are not counted)."""
    import numpy as np

    from ddstrans.shapes.world import render_scene, to_model

    probe = load_script("probe_shape_change")
    scene = render_scene(7, shape="square")
    img, mask = scene["image"].copy(), scene["mask"]
    assert probe.half_colored(to_model(img[None]))[0] == 0
    rows = np.flatnonzero(mask.any(1))
    side = mask[rows[0]]  # the square's top row
    gray = scene["scene"].bg_colors[0]
    img[rows[0], side] = 0.5 * img[rows[0], side] + 0.5 * gray  # half the chroma: in HALF_CHROMA for every color
    assert probe.half_colored(to_model(img[None]))[0] == side.sum()


def test_edges_reports_the_translators_and_the_renders(load_script, shapes_translator_dir, capsys):
    """One row for the renders and one per translator; a translator's per-miss cell is the mean half-colored count
    of its outputs on the same inputs."""
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import build_eval_set, run_method
    from ddstrans.translator import Translator

    probe = load_script("probe_shape_change")
    probe.main(["edges", "--translator", f"{shapes_translator_dir},{shapes_translator_dir}", "--n", "4"])
    rows = _rows(capsys.readouterr().out)
    assert rows["rendered answers"] == ["4", "1.000", "0.0", "-"]
    row = rows[str(shapes_translator_dir)]
    assert row[:3] == ["4", "0.000", "-"]  # the fixture's translator draws no square: every output is a miss
    y, _ = run_method("network", build_eval_set(shapes_task("to_square"), 4),
                      translator=Translator.from_pretrained(shapes_translator_dir))
    assert row[3] == f"{probe.half_colored(y).mean():.1f}"


def test_inward_offsets_of_a_shifted_smaller_square(load_script):
    """Each side's distance inside the target's box, negative outside; the target itself is 0 on every side."""
    import numpy as np

    probe = load_script("probe_shape_change")
    target = np.zeros((32, 32), bool)
    target[8:20, 10:22] = True
    assert probe.inward_offsets(target, target).tolist() == [0, 0, 0, 0]
    out = np.zeros_like(target)
    out[11:22, 11:20] = True  # 3 rows lower at the top, 2 below at the bottom, 1 in at the left, 2 at the right
    assert probe.inward_offsets(out, target).tolist() == [3, -2, 1, 2]
    assert np.isnan(probe.inward_offsets(np.zeros_like(target), target)).all()


def test_sides_reports_a_row_per_source_shape(load_script, shapes_translator_dir, capsys):
    """One row per source shape among the inputs; its IoU cell is the mean mask IoU of those inputs' outputs."""
    import numpy as np

    from ddstrans.shapes import metrics as M
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import build_eval_set, run_method
    from ddstrans.shapes.world import parse_caption
    from ddstrans.translator import Translator

    probe = load_script("probe_shape_change")
    probe.main(["sides", "--translator", str(shapes_translator_dir), "--n", "6"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {shapes_translator_dir} |")]
    es = build_eval_set(shapes_task("to_square"), 6)
    shapes = [parse_caption(c)["shape"] for c in es.src_captions]
    assert [line.split("|")[2].strip() for line in lines] == sorted(set(shapes))
    y, _ = run_method("network", es, translator=Translator.from_pretrained(shapes_translator_dir))
    masks = M.estimate_mask(M.as_unit(y))
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        idx = [k for k, s in enumerate(shapes) if s == cells[1]]
        assert cells[2] == str(len(idx))
        assert cells[3] == f"{np.mean([M.mask_iou(masks[k], es.tgt_masks[k]) for k in idx]):.3f}"


def test_misses_splits_the_evaluation_by_shape_and_size(load_script, shapes_translator_dir, capsys):
    """``misses``: the cells (source shape x target-square size) hold every input once, and their strict accuracy
    and mask IoU, weighted by their counts, are the evaluation's on the same inputs."""
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import evaluate
    from ddstrans.translator import Translator

    probe = load_script("probe_shape_change")
    probe.main(["misses", "--translator", str(shapes_translator_dir), "--n", "12", "--held-out-offset", "500"])
    lines = [ln.strip("|").split("|") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in r] for r in lines[1:]]  # after the header
    assert {c[1] for c in cells} <= {"circle", "triangle"} and len({c[2] for c in cells}) >= 2
    n = [int(c[3]) for c in cells]
    assert sum(n) == 12
    (ref,) = evaluate([shapes_task("to_square")], 12, ["network"],
                      translator=Translator.from_pretrained(shapes_translator_dir), held_out_offset=500)
    hits = sum(k * float(c[4]) for k, c in zip(n, cells))
    assert abs(hits - 12 * ref["target_acc"]) < 0.01
    assert abs(sum(k * float(c[5]) for k, c in zip(n, cells)) / 12 - ref["mask_iou"]) < 0.002
    for c in cells:  # a cell with misses names the checks they fail, one without says "-"
        assert (c[6] == "-") == (c[4] == "1.000")
