"""Does a shape mask *look like* the shape it resembles most? The geometry behind the strict shape reader.

Picking the best-fitting template (``metrics.shape_scores``) names a shape for any blob: a square with concave
sides and spikes at its corners (a "pincushion") still fits the square template best. A reader that calls that a
square rewards a translator for half a shape change. These checks ask what makes each rendered shape that shape,
with thresholds outside the range of clean renders (the constants' comments give each quantity's range over 500
held-out renders per shape, masks cleaned by ``clean_mask``; ``tests/test_shape_reader.py`` checks renders, noisy
renders and hand-drawn pincushions and blobs):

- every shape: one piece (the largest 8-connected component holds ``MIN_MAIN_COMPONENT`` of the mask) and convex —
  pixels whose centres lie in the convex hull of that piece's pixel centres but outside it (concave sides,
  holes, notches) are at most ``MAX_CONVEX_DEFICIENCY`` of its area. A render of a convex shape has exactly none
  (the hull of the pixel centres inside a convex set stays inside it), so the tolerance is all for noise: it
  allows a pixel or two, not a side bowed in by one pixel along a third of its length.
- square: fills its bounding box (``SQUARE_MIN_FILL``; renders fill it exactly), is about as wide as tall, each
  side of the box is covered by the mask within one pixel (``SQUARE_MIN_SIDE``: straight sides) and each 2x2
  corner of the box holds at least ``SQUARE_MIN_CORNER`` mask pixels (filled corners, not bevelled ones).
- circle: fills about pi/4 of its box (``CIRCLE_FILL``), as wide as tall, and overlaps the area-matched circle
  at its centroid by ``CIRCLE_MIN_IOU`` (round, not a rounded square or an ellipse).
- triangle: fills about half of its box (``TRIANGLE_FILL``), its row widths grow linearly from the apex (top) to
  the base (``TRIANGLE_MIN_R2``: straight sides) and it overlaps its best template by ``TRIANGLE_MIN_IOU``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, Delaunay, QhullError

MIN_MAIN_COMPONENT = 0.95
MAX_CONVEX_DEFICIENCY = 0.02  # renders: 0 exactly; with pixel noise of sd 0.06: <= 0.015 (300 renders)
SQUARE_MIN_FILL = 0.9  # renders: 1.0
SQUARE_MIN_SIDE = 0.75  # renders: 1.0
SQUARE_MIN_CORNER = 2  # mask pixels in each 2x2 corner of the box; renders: 4
ASPECT_RANGE = (0.8, 1.25)  # width / height; renders, cleaned: 0.89-1.125 over all shapes
CIRCLE_FILL = (0.65, 0.93)  # pi/4 = 0.785; renders of radius 5-8.5 px, cleaned: 0.70-0.90
CIRCLE_MIN_IOU = 0.88  # renders, cleaned: >= 0.93
TRIANGLE_FILL = (0.4, 0.78)  # renders, cleaned: 0.54-0.68
TRIANGLE_MIN_R2 = 0.9  # renders, cleaned: >= 0.95
TRIANGLE_MIN_IOU = 0.75  # renders, cleaned: >= 0.79 (the template search steps its size by 5%)


def convex_deficiency(mask: np.ndarray) -> float:
    """Pixels inside the convex hull of the mask's pixel centres but outside the mask, over the mask's area."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return 0.0
    pts = np.stack([xs, ys], 1).astype(np.float64)
    try:
        hull = Delaunay(pts[ConvexHull(pts).vertices])
    except QhullError:  # all pixel centres on one line: the hull is the line, which the mask covers
        return 0.0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = np.mgrid[y0:y1, x0:x1]
    inside = hull.find_simplex(np.stack([gx.ravel(), gy.ravel()], 1), tol=1e-9) >= 0
    missing = inside & ~np.asarray(mask, bool)[y0:y1, x0:x1].ravel()
    return float(missing.sum() / len(xs))


MIN_PIECE = 5  # pixels: smaller pieces of a chroma mask are noise


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """The mask without pixel noise: pixels with at most one 4-connected neighbour in the mask (stray pixels,
    one-pixel spurs on a side) and pieces under ``MIN_PIECE`` pixels are dropped. A rendered shape keeps all of
    its pixels but single-pixel tips (a triangle's apex, a small circle's extreme pixel), which the checks do not
    need; a noisy output (pixel noise of sd 0.06 makes about 1% of the background read as chroma) loses the noise
    that would stretch its bounding box and hull."""
    m = np.asarray(mask, bool)
    p = np.pad(m, 1)
    neighbours = p[:-2, 1:-1].astype(np.int8) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    m = m & (neighbours >= 2)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel())
        m = m & (sizes[labels] >= MIN_PIECE)
    return m


def main_component(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The largest 8-connected piece of the mask and its share of the mask's pixels (1.0 for one piece)."""
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask, 1.0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(sizes.argmax()) + 1, float(sizes.max() / sizes.sum())


def _row_width_r2(box: np.ndarray) -> tuple[float, float]:
    """R^2 and slope of a line fitted to the mask's width per row (top to bottom) of its bounding box."""
    widths = box.sum(1).astype(np.float64)
    rows = np.arange(len(widths), dtype=np.float64)
    if len(widths) < 3 or widths.std() == 0:
        return 0.0, 0.0
    slope, icpt = np.polyfit(rows, widths, 1)
    resid = widths - (slope * rows + icpt)
    return float(1.0 - (resid**2).sum() / ((widths - widths.mean()) ** 2).sum()), float(slope)


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """The quantities the checks test (see the module doc), for one non-empty ``(H, W)`` mask. The geometry is
    that of the largest piece, so that a stray pixel of chroma (noise) does not stretch the hull."""
    mask, share = main_component(mask)
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    r2, slope = _row_width_r2(box)
    return {
        "fill": float(box.mean()),
        "aspect": w / h,
        # per side of the box, the better covered of its outermost two lines: a side may be ragged by one pixel
        "side": float(min(box[:2].mean(1).max(), box[-2:].mean(1).max(), box[:, :2].mean(0).max(),
                          box[:, -2:].mean(0).max())),
        "corner": float(min(box[:2, :2].sum(), box[:2, -2:].sum(), box[-2:, :2].sum(), box[-2:, -2:].sum())),
        "convex_deficiency": convex_deficiency(mask),
        "main_component": share,
        "row_r2": r2,
        "row_slope": slope,
    }


def looks_like(shape: str, mask: np.ndarray, template_iou: float) -> bool:
    """Whether ``mask`` passes ``shape``'s checks; ``template_iou`` is its best IoU with that shape's templates."""
    f = shape_features(mask)
    if f["main_component"] < MIN_MAIN_COMPONENT or f["convex_deficiency"] > MAX_CONVEX_DEFICIENCY:
        return False
    square_ish = ASPECT_RANGE[0] <= f["aspect"] <= ASPECT_RANGE[1]
    if shape == "square":
        return (square_ish and f["fill"] >= SQUARE_MIN_FILL and f["side"] >= SQUARE_MIN_SIDE
                and f["corner"] >= SQUARE_MIN_CORNER)
    if shape == "circle":
        return square_ish and CIRCLE_FILL[0] <= f["fill"] <= CIRCLE_FILL[1] and template_iou >= CIRCLE_MIN_IOU
    if shape == "triangle":
        return (TRIANGLE_FILL[0] <= f["fill"] <= TRIANGLE_FILL[1] and f["row_slope"] > 0
                and f["row_r2"] >= TRIANGLE_MIN_R2 and template_iou >= TRIANGLE_MIN_IOU)
    raise ValueError(f"unknown shape {shape!r}")
