"""How an image of any size meets a network trained at one square resolution, and how the output goes back.

Why: stretching a 4:3 photo to a square distorts every shape the teacher taught the network to read, so the
default keeps the aspect ratio. The modes (``fit``):

- ``pad`` (default): scale the longer side to the resolution, pad the shorter one (edge pixels repeated), translate,
  cut the padding off and scale back to the input's size. Every input pixel is translated.
- ``crop``: scale the shorter side to the resolution and translate the center square; the output is that square
  at the input's scale (``min(w, h)`` pixels a side).
- ``resize``: stretch to the square and back (the behaviour before aspect ratios were kept).
- ``native``: run at the input's own size, rounded to the generator's size multiple (fully convolutional
  generators only), and scale back to the exact input size when the rounding changed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

FITS = ("pad", "crop", "resize", "native")


@dataclass(frozen=True)
class Placement:
    """Where the network's view came from: ``box`` (l, t, r, b) of the network image to keep, and ``size``
    (w, h) of the output to return."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]


def round_to_multiple(n: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``n`` (at least one multiple)."""
    return max(multiple, int(round(n / multiple)) * multiple)


def fit_image(im: Image.Image, fit: str, resolution: int, multiple: int = 1) -> tuple[Image.Image, Placement]:
    """The network's input for ``im`` and where to put its output back (see the module docstring)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    w, h = im.size
    r = resolution
    if fit == "resize":
        return _resize(im, (r, r)), Placement((0, 0, r, r), (w, h))
    if fit == "native":
        nw, nh = round_to_multiple(w, multiple), round_to_multiple(h, multiple)
        return _resize(im, (nw, nh)), Placement((0, 0, nw, nh), (w, h))
    if fit == "pad":
        s = r / max(w, h)
        nw, nh = min(r, max(1, round(w * s))), min(r, max(1, round(h * s)))
        left, top = (r - nw) // 2, (r - nh) // 2
        arr = np.asarray(_resize(im, (nw, nh)))
        arr = np.pad(arr, ((top, r - nh - top), (left, r - nw - left), (0, 0)), mode="edge")
        return Image.fromarray(arr), Placement((left, top, left + nw, top + nh), (w, h))
    # crop
    s = r / min(w, h)
    nw, nh = max(r, round(w * s)), max(r, round(h * s))
    left, top = (nw - r) // 2, (nh - r) // 2
    side = min(w, h)
    return _resize(im, (nw, nh)).crop((left, top, left + r, top + r)), Placement((0, 0, r, r), (side, side))


def restore_image(out: Image.Image, placement: Placement) -> Image.Image:
    """The network's output cut to ``placement.box`` and scaled to ``placement.size``."""
    if placement.box != (0, 0, *out.size):
        out = out.crop(placement.box)
    return _resize(out, placement.size)


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    return im if im.size == tuple(size) else im.resize(size, Image.BICUBIC)
