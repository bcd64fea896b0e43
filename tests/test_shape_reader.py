"""The strict shape reader: hand-drawn pincushions and blobs are no shape, clean renders of every shape are theirs."""

import numpy as np
import pytest

from ddstrans.shapes import COLORS, SHAPES, render_batch, seeds, shape_mask
from ddstrans.shapes import metrics as M
from ddstrans.shapes import shape_checks as C

YY, XX = np.mgrid[0:32, 0:32].astype(np.float64) + 0.5


def pincushion(depth: float, cx=16.0, cy=16.0, h=7.0) -> np.ndarray:
    """A square of half side ``h`` whose four sides bow inward by ``depth`` px at their middles: corners stay."""
    dx, dy = XX - cx, YY - cy
    return (np.abs(dx) <= h - depth * (1 - (dy / h) ** 2)) & (np.abs(dy) <= h - depth * (1 - (dx / h) ** 2))


def blob() -> np.ndarray:
    """Three overlapping discs: a lumpy, non-convex patch of about a shape's area."""
    return ((XX - 13) ** 2 + (YY - 15) ** 2 <= 25) | ((XX - 19) ** 2 + (YY - 14) ** 2 <= 16) \
        | ((XX - 16) ** 2 + (YY - 20) ** 2 <= 12)


def on_image(mask: np.ndarray, color="red", gray=0.2) -> np.ndarray:
    img = np.full((32, 32, 3), gray, np.float32)
    img[mask] = COLORS[color]
    return img


def strict(mask) -> str | None:
    return M.classify_shape(masks=mask)[0]


def lenient(mask) -> str | None:
    return M.classify_shape(masks=mask, strict=False)[0]


@pytest.mark.parametrize(("h", "depth"), [(7.0, 1.0), (7.0, 2.0), (8.0, 2.0), (8.0, 3.0)])
def test_pincushion_is_no_square(h, depth):
    m = pincushion(depth, h=h)
    assert lenient(m) is not None  # the lenient reader names some shape for it ...
    assert strict(m) is None  # ... the strict one none
    assert C.shape_features(m)["convex_deficiency"] > C.MAX_CONVEX_DEFICIENCY
    assert M.classify_shape(on_image(m))[0] is None
    assert M.target_accuracy(on_image(m), "shape", "square") == 0.0


def test_blob_and_misshapen_masks_are_no_shape():
    ellipse = ((XX - 16) / 9) ** 2 + ((YY - 16) / 5.5) ** 2 <= 1
    holed = pincushion(0.0) & ~(((XX - 16) ** 2 + (YY - 16) ** 2) <= 4)  # a dark spot inside a square
    two = pincushion(0.0, cx=10, cy=10, h=4) | pincushion(0.0, cx=23, cy=23, h=4)
    for m in (blob(), ellipse, holed, two):
        assert lenient(m) is not None and strict(m) is None, C.shape_features(m)
    for cut in (3, 4):  # corners cut off: an octagon, convex, but no square (a big cut reads as round)
        octagon = pincushion(0.0) & (np.abs(XX - 16) + np.abs(YY - 16) <= 14 - cut)
        assert lenient(octagon) == "square" or cut == 4
        assert strict(octagon) != "square", C.shape_features(octagon)


def test_clean_hand_drawn_shapes_read_as_themselves():
    square = pincushion(0.0)  # filled corners, straight sides
    circle = (XX - 15.3) ** 2 + (YY - 16.6) ** 2 <= 6.5**2
    triangle = shape_mask("triangle", 16.2, 15.7, 7.0)
    for want, m in (("square", square), ("circle", circle), ("triangle", triangle)):
        assert strict(m) == want
        assert M.classify_shape(on_image(m, color="blue", gray=0.0))[0] == want
    assert C.shape_features(square)["fill"] == 1.0


def test_clean_renders_of_every_shape_are_accepted():
    """Held-out renders of every size and position the world draws (the design note measures 500 per shape)."""
    n = 120
    for shape in SHAPES:
        _, masks, _ = render_batch(seeds.take(seeds.HELD_OUT, 0, n), shape=shape)
        got = M.classify_shape(masks=masks)
        assert np.mean([g == shape for g in got]) >= 0.99, (shape, [g for g in got if g != shape])
        assert all(C.shape_features(C.clean_mask(m))["convex_deficiency"] == 0 for m in masks[:40])


def test_strict_reader_tolerates_pixel_noise():
    imgs, masks, caps = render_batch(seeds.take(seeds.HELD_OUT, 0, 90))
    want = [c.split()[2] for c in caps]
    noisy = np.clip(imgs + np.random.default_rng(0).normal(0, 0.06, imgs.shape), 0, 1).astype(np.float32)
    assert np.mean([g == w for g, w in zip(M.classify_shape(noisy), want)]) >= 0.97


def test_accuracy_uses_the_strict_reader():
    imgs = np.stack([on_image(pincushion(2.0)), on_image(pincushion(0.0))])
    assert M.target_accuracy(imgs, "shape", "square") == 0.5


def test_shape_readers_script_scores_both_readers(tmp_path):
    """scripts/shape_readers.py on a cache: rendered squares count for both readers, pincushions only for the
    lenient one."""
    import subprocess
    import sys
    from pathlib import Path

    seeds_ = seeds.take(seeds.HELD_OUT, 0, 4)
    inputs, src, _ = render_batch(seeds_, shape="circle")
    answers, tgt, _ = render_batch(seeds_, shape="square")
    pins = np.stack([on_image(pincushion(2.0, h=8.0)) for _ in seeds_])
    cache = tmp_path / "c.npz"
    np.savez(cache, inputs=inputs, src_masks=src, tgt_masks=tgt, targets=np.array(["square"] * 4),
             out_answer=answers, out_pins=pins)
    script = Path(__file__).resolve().parents[1] / "scripts" / "shape_readers.py"
    proc = subprocess.run([sys.executable, str(script), "--cache", str(cache), "--methods", "answer,pins"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| answer") or line.startswith("| pins")}
    assert rows["answer"][:4] == ["4", "1.000", "1.000", "1.000"]
    assert rows["pins"][1:3] == ["1.000", "0.000"]
