"""The shapes world: renderer ground truth, captions, target renders, and the metrics."""

import numpy as np
import pytest
import torch

from ddstrans.shapes import (
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    GRAYS,
    SHAPES,
    VOCAB,
    all_captions,
    caption,
    from_model,
    parse_caption,
    render_batch,
    render_scene,
    render_target,
    sample_scene,
    shape_mask,
    to_model,
)
from ddstrans.shapes import metrics as M

SEEDS = range(200)


@pytest.fixture(scope="module")
def batch():
    imgs, masks, caps = render_batch(SEEDS)
    return imgs, masks, caps, [parse_caption(c) for c in caps]


def test_render_is_deterministic_and_in_range():
    a, b = render_scene(7), render_scene(7)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.float32
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert not np.array_equal(render_scene(8)["image"], a["image"])


def test_ground_truth_is_consistent(batch):
    imgs, masks, caps, attrs = batch
    for seed, img, mask, cap in zip(SEEDS, imgs, masks, caps):
        r = render_scene(seed)
        scene = r["scene"]
        # mask pixels carry exactly the shape color, all others are one of the two grays
        assert np.allclose(img[mask], COLORS[r["color"]])
        bg = img[~mask]
        assert np.allclose(bg[:, 0], bg[:, 1]) and np.allclose(bg[:, 1], bg[:, 2])
        levels = np.unique(bg[:, 0])
        assert all(np.isclose(v, scene.bg_colors, atol=1e-6).any() for v in levels)
        assert set(scene.bg_colors) <= set(GRAYS)
        # both grays visible (textured), shape fully inside the frame with a plausible area
        assert len(levels) == 2
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert 40 <= mask.sum() <= 260
        # the mask is the renderer's shape at the recorded position and size
        assert np.array_equal(mask, shape_mask(r["shape"], *r["position"], r["size"]))
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - r["position"][0]) < 1.0
        assert cap == scene.caption


def test_attributes_cover_the_grammar(batch):
    _, _, _, attrs = batch
    assert {a["color"] for a in attrs} == set(COLOR_NAMES)
    assert {a["shape"] for a in attrs} == set(SHAPES)
    assert {a["background"] for a in attrs} == set(BACKGROUNDS)
    assert len(COLOR_NAMES) >= 4 and len(SHAPES) >= 3 and len(BACKGROUNDS) >= 2


def test_captions_parse_back():
    assert caption("red", "circle", "striped") == "a red circle on a striped background"
    for cap in all_captions():
        a = parse_caption(cap)
        assert caption(a["color"], a["shape"], a["background"]) == cap
        assert set(cap.split()) <= set(VOCAB)
    assert len(all_captions()) == len(COLOR_NAMES) * len(SHAPES) * len(BACKGROUNDS)
    assert parse_caption(" A Blue Triangle on a checkered background ")["color"] == "blue"
    for bad in ["a purple circle on a striped background", "a red circle", "", "a red blob on a striped background"]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_target_render_changes_only_that_attribute():
    for seed in range(30):
        src = render_scene(seed)
        new = next(c for c in COLOR_NAMES if c != src["color"])
        tgt = render_target(seed, color=new)
        assert np.array_equal(tgt["mask"], src["mask"])
        assert np.array_equal(tgt["image"][~src["mask"]], src["image"][~src["mask"]])
        assert np.allclose(tgt["image"][tgt["mask"]], COLORS[new])
        assert parse_caption(tgt["caption"]) == {**parse_caption(src["caption"]), "color": new}
        bg = next(b for b in BACKGROUNDS if b != src["background"])
        tb = render_target(seed, background=bg)
        assert np.array_equal(tb["mask"], src["mask"]) and tb["background"] == bg
        assert np.array_equal(tb["image"][src["mask"]], src["image"][src["mask"]])
        sh = next(s for s in SHAPES if s != src["shape"])
        ts = render_target(seed, shape=sh)
        assert ts["position"] == src["position"] and ts["size"] == src["size"] and ts["shape"] == sh
    with pytest.raises(ValueError):
        sample_scene(0, color="purple")
    with pytest.raises(ValueError):
        sample_scene(0, size=3)


def test_model_layout_roundtrip(batch):
    imgs = batch[0][:4]
    x = to_model(imgs)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.allclose(from_model(x), imgs, atol=1e-6)
    assert np.allclose(M.as_unit(x), imgs, atol=1e-6)


# ------------------------------------------------------------------------------------ metrics


def test_attribute_readers_are_exact_on_renders(batch):
    imgs, masks, _, attrs = batch
    assert np.array_equal(M.estimate_mask(imgs), masks)
    assert M.classify_color(imgs) == [a["color"] for a in attrs]
    assert M.classify_shape(imgs) == [a["shape"] for a in attrs]
    assert M.classify_background(imgs) == [a["background"] for a in attrs]
    # the same from the model layout in [-1, 1]
    assert M.classify_color(to_model(imgs[:8])) == [a["color"] for a in attrs[:8]]


def test_attribute_readers_tolerate_noise(batch):
    imgs, masks, _, attrs = batch
    rng = np.random.default_rng(0)
    noisy = np.clip(imgs + rng.normal(0, 0.06, imgs.shape), 0, 1).astype(np.float32)
    for attr in ("color", "shape", "background"):
        acc = np.mean([p == a[attr] for p, a in zip(M.classify(noisy, attr), attrs)])
        assert acc >= 0.97, (attr, acc)
    assert M.structure_iou(noisy, masks) > 0.95


def test_background_reader_needs_checkers_to_call_a_background_checkered():
    """Erasing the stripes is not drawing checkers: a washed-out, flat or blurred-away background reads as
    neither (``None``) and never counts for ``to_checkered``; real checkers still read as checkered after noise
    or a slight blur."""
    seeds = range(48)
    striped, masks, _ = render_batch(seeds, background="striped")
    checkered = render_batch(seeds, background="checkered")[0]
    flat = striped.copy()
    flat[~masks] = 0.55  # stripes erased to one gray
    washed = striped.copy()
    washed[~masks] = 0.55 + 0.1 * (striped[~masks] - 0.55)  # stripes faded to 10 % contrast, plus noise
    washed = np.clip(washed + np.random.default_rng(1).normal(0, 0.04, washed.shape), 0, 1)
    for bad in (flat, washed):
        assert M.target_accuracy(bad, "background", "checkered") == 0.0
        assert M.classify_background(bad, masks).count("checkered") == 0
    assert M.classify_background(flat, masks) == [None] * len(seeds)
    blurred = 0.6 * checkered + 0.2 * np.roll(checkered, 1, axis=1) + 0.2 * np.roll(checkered, 1, axis=2)
    noisy = np.clip(checkered + np.random.default_rng(2).normal(0, 0.1, checkered.shape), 0, 1)
    for good in (checkered, blurred, noisy):
        assert M.target_accuracy(good, "background", "checkered") >= 0.97
    r2_checkered = [M.checker_r2(x, m) for x, m in zip(checkered, masks)]
    r2_striped = [M.checker_r2(x, m) for x, m in zip(striped, masks)]
    assert min(r2_checkered) > 0.99 and max(r2_striped) < M.CHECKER_R2_THRESHOLD
    # the fit names the renderer's own cell size and offset
    for seed, img, mask in zip(seeds, checkered, masks):
        scene = sample_scene(seed, background="checkered")
        assert M.checker_fit(img, mask)[0] == (scene.checker_cell, *scene.checker_offset)


def test_identity_and_perfect_recolor():
    seeds = range(32)
    imgs, masks, _ = render_batch(seeds, color="red")
    tgt, tmasks, _ = render_batch(seeds, color="blue")
    ident = M.evaluate_edit(imgs, imgs, masks, "color", "blue")
    assert ident["target_acc"] == 0.0
    assert ident["mask_iou"] == 1.0
    assert ident["keep_psnr"] >= 99.0  # identical background (capped)
    assert ident["diversity"] == pytest.approx(1.0)
    perfect = M.evaluate_edit(tgt, imgs, masks, "color", "blue")
    assert perfect["target_acc"] == 1.0 and perfect["mask_iou"] == 1.0 and perfect["keep_psnr"] >= 99.0
    # shape and background tasks
    shp = [render_target(s, shape="triangle") for s in seeds]
    assert M.target_accuracy(np.stack([r["image"] for r in shp]), "shape", "triangle") == 1.0
    bgs = render_batch(seeds, background="checkered")[0]
    assert M.target_accuracy(bgs, "background", "checkered") == 1.0
    assert M.target_accuracy(render_batch(seeds, background="striped")[0], "background", "checkered") == 0.0


def test_metrics_detect_damage():
    seeds = range(32)
    imgs, masks, _ = render_batch(seeds, color="red")
    tgt = render_batch(seeds, color="blue")[0]
    # a shifted shape loses IoU; a faded shape loses its color and mask
    shifted = np.roll(tgt, 4, axis=2)
    assert M.structure_iou(shifted, masks) < 0.75
    faded = imgs.copy()
    faded[masks] = 0.5
    assert M.target_accuracy(faded, "color", "blue") == 0.0 and M.structure_iou(faded, masks) == 0.0
    # background drift lowers PSNR by the expected amount: uniform +0.1 -> 20 dB
    drift = tgt.copy()
    drift[~masks] = np.clip(drift[~masks] + 0.1, 0, 1)
    assert 19.0 < M.background_psnr(drift, imgs, masks, dilation=0) < 21.5
    # mode collapse: every output the same image -> diversity 0
    collapsed = np.repeat(tgt[:1], len(tgt), axis=0)
    assert M.diversity(collapsed, imgs) == 0.0
    assert M.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_mask_of_torch_and_numpy_agree():
    img = render_scene(3)["image"]
    assert np.array_equal(M.estimate_mask(img), M.estimate_mask(torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1)[0])


def test_background_edits_keep_psnr_is_measured_on_the_shape():
    """For background tasks the background is supposed to change; what must stay is the shape."""
    seeds = range(16)
    imgs, masks, _ = render_batch(seeds, background="striped")
    perfect = render_batch(seeds, background="checkered")[0]
    m = M.evaluate_edit(perfect, imgs, masks, "background", "checkered")
    assert m["target_acc"] == 1.0 and m["keep_psnr"] >= 99.0  # the shape is untouched
    assert M.background_psnr(perfect, imgs, masks) < 20  # the background did change
    recolored = perfect.copy()
    recolored[masks] = np.clip(recolored[masks] + 0.2, 0, 1)  # the edit also tinted the shape
    assert 13.0 < M.evaluate_edit(recolored, imgs, masks, "background", "checkered")["keep_psnr"] < 20.0


def test_background_readers_keep_their_margins_under_noise():
    """The margins behind the metrics docstring's thresholds: checkers never read as stripes, and stay checkers
    under pixel noise of sd 0.1; stripes never fit a checker template."""
    ck, ckm, _ = render_batch(range(40), background="checkered")
    st, stm, _ = render_batch(range(20), background="striped")
    assert max(M.background_ratio(x, m) for x, m in zip(ck, ckm)) < M.BACKGROUND_RATIO_THRESHOLD
    noisy = np.clip(ck[:20] + np.random.default_rng(0).normal(0, 0.1, ck[:20].shape), 0, 1)
    assert min(M.checker_r2(x, m) for x, m in zip(noisy, ckm)) > M.CHECKER_R2_THRESHOLD
    assert max(M.checker_r2(x, m) for x, m in zip(st, stm)) < M.CHECKER_R2_THRESHOLD
