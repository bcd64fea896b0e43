"""Metrics of shapes-world edits, computed against the renderer's ground truth.

Conventions
-----------
- Images are numpy arrays ``(B, H, W, 3)`` (or one ``(H, W, 3)``) with values in **[0, 1]**.
  Torch tensors are taken to be in the model layout ``(B, 3, H, W)`` in **[-1, 1]** and are
  converted by :func:`as_unit`; every function below accepts either.
- Masks are boolean ``(B, H, W)`` / ``(H, W)``.

How attributes are read from an arbitrary image (a render, a teacher sample, a network output)
---------------------------------------------------------------------------------------------
- **Shape mask**: background pixels are gray (chroma 0) and shape colors are clearly colored
  (chroma >= 0.5), so ``mask = max(rgb) - min(rgb) > CHROMA_THRESHOLD`` (0.25, halfway). On renders this
  reproduces the ground-truth mask exactly (tested).
- **Color**: every pixel of the estimated mask votes for its nearest palette color (Euclidean in
  RGB); the majority wins. No mask (fewer than ``MIN_PIXELS`` pixels) -> ``None`` (never correct).
- **Shape**: the estimated mask is compared by IoU with the renderer's circle / square / triangle
  masks of the same centroid and an area-matched size (a few sizes around it); the best IoU wins. The strict
  reader (the default, the one accuracy uses) takes the best-fitting shape that the mask also looks like
  (:mod:`ddstrans.shapes.shape_checks`: convex and in one piece; a square fills its bounding box with straight
  sides and filled corners, a circle is round, a triangle's sides are straight). Every clean render passes (500
  held-out renders per shape); a pincushion or a blob reads as ``None`` and never counts as a change.
- **Background kind**: stripes are constant along one of the four directions 0/45/90/135 degrees,
  checkers along none. For each direction the gray background (shape dilated by 1 px excluded)
  is replaced by its means along lines of that direction; the largest fraction of variance this
  1-D profile explains is 1 for clean stripes and at most 0.44 for clean checkers (measured over
  2,000 renders); ``> BACKGROUND_RATIO_THRESHOLD`` (0.6) -> "striped". Line means average pixel
  noise away, so the classifier tolerates noisy or blurred outputs (tested). "Checkered" needs
  evidence of its own: the background's squared correlation with the best axis-aligned checker
  template (cells of 3 to 6 px at any offset, as the renderer draws them) must exceed
  ``CHECKER_R2_THRESHOLD`` (0.6). Measured on 400 renders: 1.00 for checkers (>= 0.71 after noise of
  sd 0.1 or a Gaussian blur of 0.8 px: the textures' contrast is 0.2-0.3), <= 0.34 for stripes
  (``tests/test_shapes_world.py`` checks these margins). A background that is neither (stripes
  washed out to a flat gray, say) reads as ``None`` and never counts as a successful change —
  without this rule a network that only erased the stripes scored 0.92 on ``to_checkered``.
"""

from __future__ import annotations

import numpy as np

from .shape_checks import clean_mask, looks_like
from .world import BACKGROUNDS, COLOR_ARRAY, COLOR_NAMES, SHAPES, SIZE, shape_mask

CHROMA_THRESHOLD = 0.25
MIN_PIXELS = 4
BACKGROUND_RATIO_THRESHOLD = 0.6
CHECKER_R2_THRESHOLD = 0.6
CHECKER_CELLS = (3, 4, 5, 6)


# ----------------------------------------------------------------------------------- conversion


def as_unit(images) -> np.ndarray:
    """numpy ``(..., H, W, 3)`` in [0, 1] (passed through) or torch ``(B, 3, H, W)`` in [-1, 1]."""
    try:
        import torch

        if isinstance(images, torch.Tensor):
            x = ((images.detach().float().clamp(-1, 1) + 1.0) / 2.0).cpu()
            if x.ndim == 3:
                x = x[None]
            return x.permute(0, 2, 3, 1).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)


def _batch(images) -> tuple[np.ndarray, bool]:
    x = as_unit(images)
    if x.ndim == 3:
        return x[None], True
    return x, False


def _masks(masks, n: int) -> np.ndarray:
    m = np.asarray(masks, dtype=bool)
    if m.ndim == 2:
        m = np.broadcast_to(m, (n, *m.shape))
    return m


def shift_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(..., H, W) masks moved by ``dy`` rows down and ``dx`` columns right; pixels moved in are False."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape[-2:]
    out = np.zeros_like(m)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        m[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation by a (2r+1)x(2r+1) square, for (..., H, W) masks."""
    m = np.asarray(mask, dtype=bool)
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy or dx:
                out |= shift_mask(m, dy, dx)
    return out


# ------------------------------------------------------------------------------ attribute reading


def chroma(images) -> np.ndarray:
    """Per pixel, max minus min of the color channels: 0 for the world's grays, >= 0.5 for its colors; same leading
    shape as ``images`` minus channels."""
    x, single = _batch(images)
    c = x.max(-1) - x.min(-1)
    return c[0] if single else c


def estimate_mask(images) -> np.ndarray:
    """Shape mask from chroma (see module doc); same leading shape as ``images`` minus channels."""
    return chroma(images) > CHROMA_THRESHOLD


def classify_color(images, masks=None) -> list[str | None]:
    """Majority nearest-palette color of the pixels in ``masks`` (default: the estimated mask)."""
    x, _ = _batch(images)
    m = estimate_mask(x) if masks is None else _masks(masks, len(x))
    out: list[str | None] = []
    for img, mk in zip(x, m):
        px = img[mk]
        if len(px) < MIN_PIXELS:
            out.append(None)
            continue
        d = ((px[:, None, :] - COLOR_ARRAY[None]) ** 2).sum(-1)
        votes = np.bincount(d.argmin(1), minlength=len(COLOR_NAMES))
        out.append(COLOR_NAMES[int(votes.argmax())])
    return out


_AREA_PER_SIZE2 = {s: float(shape_mask(s, SIZE / 2, SIZE / 2, 8.0).sum()) / 64.0 for s in SHAPES}


def _centered_candidate(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    m = shape_mask(shape, cx, cy, size)
    if m.any():  # shift so that the candidate's centroid lands on (cx, cy)
        ys, xs = np.nonzero(m)
        m = shape_mask(shape, 2 * cx - (xs.mean() + 0.5), 2 * cy - (ys.mean() + 0.5), size)
    return m


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Best IoU of ``mask`` with each shape of the same centroid and an area-matched size."""
    mask = np.asarray(mask, dtype=bool)
    area = mask.sum()
    if area < MIN_PIXELS:
        return {s: 0.0 for s in SHAPES}
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    scores = {}
    for s in SHAPES:
        s0 = np.sqrt(area / _AREA_PER_SIZE2[s])
        best = 0.0
        for f in (0.9, 0.95, 1.0, 1.05, 1.1):
            c = _centered_candidate(s, cx, cy, s0 * f)
            best = max(best, mask_iou(mask, c))
        scores[s] = best
    return scores


def classify_shape(images=None, masks=None, strict: bool = True) -> list[str | None]:
    """Shape of each image's mask (``masks`` given, or estimated from ``images``): the best-fitting template's,
    and with ``strict`` (the reader accuracy uses) the best-fitting one whose checks the mask passes
    (:func:`ddstrans.shapes.shape_checks.looks_like`: convex, one piece; a square fills its box with straight
    sides), else ``None``; it first drops pixel noise from the mask (``clean_mask``). The lenient reader
    (``strict=False``) names a shape for any blob."""
    m = estimate_mask(images) if masks is None else np.asarray(masks, dtype=bool)
    if m.ndim == 2:
        m = m[None]
    out: list[str | None] = []
    for mk in m:
        if strict:
            mk = clean_mask(mk)
        sc = shape_scores(mk)
        ranked = [s for s in sorted(sc, key=sc.get, reverse=True) if sc[s] > 0]
        if strict:  # the best-fitting shape whose checks the mask passes: the checks say what a shape is
            ranked = [s for s in ranked if looks_like(s, mk, sc[s])]
        out.append(ranked[0] if ranked else None)
    return out


_YI, _XI = np.mgrid[0:SIZE, 0:SIZE]
# Lines along which stripes of angle 0 / 90 / 45 / 135 degrees are constant.
_LINE_KEYS = (_XI, _YI, _XI + _YI, _YI - _XI + SIZE)


def _background_gray(image, mask=None) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Mean-centered gray levels of the background pixels, the boolean map of those pixels (shape
    dilated by 1 px excluded; mask estimated if not given) and their total variance; ``None`` when
    the background is too small or flat to have a texture."""
    x = as_unit(image)
    if x.ndim == 4:
        x = x[0]
    keep = ~dilate(estimate_mask(x) if mask is None else np.asarray(mask, bool), 1)
    g = x.mean(-1).astype(np.float64)[keep]
    g = g - g.mean()
    total = float((g**2).sum())
    if len(g) < 16 or total < 1e-8:
        return None
    return g, keep, total


def background_ratio(image, mask=None) -> float:
    """Largest fraction of the background's gray-level variance explained by a 1-D profile
    (mean along lines of one of the four stripe directions); ~1 for stripes, small for checkers.
    Shape pixels (dilated by 1 px) are excluded; averaging along lines also averages noise out."""
    return _stripe_ratio(_background_gray(image, mask))


def _stripe_ratio(bg) -> float:
    if bg is None:
        return 0.0  # flat: no stripes (and no checkers: classify_background says None)
    g, keep, total = bg
    best = 0.0
    for key in _LINE_KEYS:
        k = key[keep]
        n = np.bincount(k, minlength=2 * SIZE + 1)
        means = np.bincount(k, weights=g, minlength=2 * SIZE + 1) / np.maximum(n, 1)
        best = max(best, float((means[k] ** 2).sum() / total))
    return best


CHECKER_TEMPLATES: tuple[tuple[int, int, int], ...] = tuple(
    (c, ox, oy) for c in CHECKER_CELLS for ox in range(c) for oy in range(c))  # (cell px, x offset, y offset)
_CHECKERS = np.stack([((_XI + ox) // c + (_YI + oy) // c) % 2 for c, ox, oy in CHECKER_TEMPLATES]).astype(np.float64)


def checker_fit(image, mask=None) -> tuple[tuple[int, int, int], float]:
    """The axis-aligned checker template (cell 3-6 px, any offset; see ``CHECKER_TEMPLATES``) that best fits the
    gray background (shape dilated by 1 px excluded), and its squared correlation with it: 1 for clean checkers,
    low for stripes, flat or unstructured backgrounds."""
    return _checker_fit(_background_gray(image, mask))


def _checker_fit(bg) -> tuple[tuple[int, int, int], float]:
    if bg is None:
        return CHECKER_TEMPLATES[0], 0.0
    g, keep, total = bg
    t = _CHECKERS[:, keep]
    t = t - t.mean(1, keepdims=True)
    r2 = (t @ g) ** 2 / np.maximum((t**2).sum(1) * total, 1e-12)
    i = int(r2.argmax())
    return CHECKER_TEMPLATES[i], float(r2[i])


def checker_r2(image, mask=None) -> float:
    """Squared correlation of the background with its best checker template (:func:`checker_fit`)."""
    return checker_fit(image, mask)[1]


def classify_background(images, masks=None) -> list[str | None]:
    """"striped", "checkered" or ``None`` (neither texture) per image (shape pixels excluded; mask
    estimated if not given)."""
    x, _ = _batch(images)
    m = [None] * len(x) if masks is None else _masks(masks, len(x))
    out: list[str | None] = []
    for img, mk in zip(x, m):
        bg = _background_gray(img, mk)  # once, for both readers
        if _stripe_ratio(bg) > BACKGROUND_RATIO_THRESHOLD:
            out.append(BACKGROUNDS[0])
        elif _checker_fit(bg)[1] > CHECKER_R2_THRESHOLD:
            out.append(BACKGROUNDS[1])
        else:
            out.append(None)
    return out


def classify(images, attribute: str) -> list[str | None]:
    """Read ``attribute`` ("color" / "shape" / "background") from each image; several joined by ``+``
    (``"color+shape"``) read as ``"blue+square"``, None when any of them reads as nothing."""
    if "+" in attribute:
        parts = [classify(images, a) for a in attribute.split("+")]
        return [None if None in vals else "+".join(vals) for vals in zip(*parts)]
    if attribute == "color":
        return classify_color(images)
    if attribute == "shape":
        return classify_shape(images)
    if attribute == "background":
        return classify_background(images)
    raise ValueError(f"unknown attribute {attribute!r}")


# ------------------------------------------------------------------------------------- metrics


def target_hits(images, attribute: str, targets) -> list[bool]:
    """Per image, whether its ``attribute`` reads as the target value (a str or one per image)."""
    x, _ = _batch(images)
    if isinstance(targets, str):
        targets = [targets] * len(x)
    return [p == t for p, t in zip(classify(x, attribute), targets)]


def target_accuracy(images, attribute: str, targets) -> float:
    """Fraction of images whose ``attribute`` reads as the target value (a str or one per image)."""
    return float(np.mean(target_hits(images, attribute, targets)))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def structure_iou(images, ref_masks) -> float:
    """Mean IoU between each image's estimated shape mask and its reference (e.g. the input's
    ground-truth mask): position and size preserved -> 1.0."""
    x, _ = _batch(images)
    est = estimate_mask(x)
    ref = _masks(ref_masks, len(x))
    return float(np.mean([mask_iou(e, r) for e, r in zip(est, ref)]))


def region_psnr(images, references, regions) -> float:
    """Mean PSNR (dB, data range 1 on [0, 1] images) between ``images`` and ``references`` over the
    pixels where ``regions`` is true. Identical regions give ``inf`` per image; the mean is capped at 100."""
    x, _ = _batch(images)
    r, _ = _batch(references)
    m = _masks(regions, len(x))
    vals = []
    for a, b, keep in zip(x, r, m):
        mse = float(((a - b) ** 2)[keep].mean()) if keep.any() else 0.0
        vals.append(100.0 if mse <= 1e-10 else min(100.0, 10 * np.log10(1.0 / mse)))
    return float(np.mean(vals))


def background_psnr(images, references, masks, dilation: int = 1) -> float:
    """PSNR outside ``masks`` dilated by ``dilation`` px (pass the union of source and target masks for
    shape edits): did the background stay as it was?"""
    x, _ = _batch(images)
    m = _masks(masks, len(x))
    return region_psnr(x, references, ~(dilate(m, dilation) if dilation else m))


def object_psnr(images, references, masks, erosion: int = 1) -> float:
    """PSNR inside ``masks`` eroded by ``erosion`` px: did the shape stay as it was (background edits)?"""
    x, _ = _batch(images)
    m = _masks(masks, len(x))
    return region_psnr(x, references, ~dilate(~m, erosion) if erosion else m)


def mean_pairwise_distance(images) -> float:
    """Mean L2 distance between all pairs of images (flattened, [0, 1])."""
    x, _ = _batch(images)
    f = x.reshape(len(x), -1).astype(np.float64)
    if len(f) < 2:
        return 0.0
    total, count = 0.0, 0
    for i in range(len(f) - 1):  # exact differences (no Gram-matrix cancellation)
        d = np.sqrt(((f[i + 1:] - f[i]) ** 2).sum(1))
        total += float(d.sum())
        count += len(d)
    return total / count


def diversity(outputs, inputs) -> float:
    """Spread of outputs over spread of inputs (mean pairwise distances). ~1 when outputs vary
    as much as the inputs (identity gives exactly 1), near 0 under mode collapse."""
    d_in = mean_pairwise_distance(inputs)
    return mean_pairwise_distance(outputs) / d_in if d_in > 0 else 0.0


def evaluate_edit(outputs, inputs, src_masks, attribute: str, targets, tgt_masks=None) -> dict[str, float]:
    """All metrics of one task: target accuracy (every attribute of a ``+``-joined one at its target), mask IoU (vs
    the target's ground-truth mask, i.e. the source mask unless the shape changes), ``keep_psnr`` — PSNR of what the
    task must leave alone: the background outside the union of source and target masks for color and shape edits,
    the shape (mask eroded by 1 px) for background edits, NaN when the background and the shape's look both
    change (nothing is left alone) — and diversity; for a ``+``-joined attribute also each one's accuracy
    (``color_acc``, ``shape_acc``, ...)."""
    x, _ = _batch(outputs)
    src = _masks(src_masks, len(x))
    tgt = src if tgt_masks is None else _masks(tgt_masks, len(x))
    names = attribute.split("+")
    attrs = set(names)
    if "background" not in attrs:
        keep = background_psnr(x, inputs, src | tgt)
    elif attrs == {"background"}:
        keep = object_psnr(x, inputs, src & tgt)
    else:
        keep = float("nan")
    if isinstance(targets, str):
        targets = [targets] * len(x)
    # each attribute read once: per image, whether it shows its target (``targets`` joined like ``attribute``)
    hits = {a: target_hits(x, a, [t.split("+")[i] for t in targets]) for i, a in enumerate(names)}
    out = {
        "target_acc": float(np.mean([all(h) for h in zip(*hits.values())])),
        "mask_iou": structure_iou(x, tgt),
        "keep_psnr": keep,
        "diversity": diversity(x, inputs),
    }
    if len(names) > 1:  # each change on its own (``color_acc``, ...): half an edit from none
        out.update({f"{a}_acc": float(np.mean(h)) for a, h in hits.items()})
    return out
