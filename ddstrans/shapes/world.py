"""The shapes world: tiny RGB scenes whose ground truth is known exactly.

A scene is one shape (circle / square / triangle) in one of four light colors at a random
position and size, on a textured background (stripes or checkers) whose two colors are dark *grays*
drawn from a palette disjoint from the shape colors. Because every background pixel is gray and
every shape pixel is clearly colored (chroma >= 0.5), the shape mask of *any* image (also a network's output)
can be estimated from chroma alone (see :mod:`ddstrans.shapes.metrics`).

Everything is pure numpy and deterministic from an integer seed. All attributes are drawn from
the seed's generator in a fixed order *before* overrides are applied, so
``render_scene(seed, color="blue")`` is the same scene as ``render_scene(seed)`` with only the
color changed (same position, size, background colors, phase and detail).

Images are float32 arrays of shape ``(H, W, 3)`` in ``[0, 1]``; :func:`to_model` maps them to the
``(3, H, W)`` torch layout in ``[-1, 1]`` that the diffusion teacher uses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

SIZE = 32

# Light colors on dark grays: every shape color is closer to every other than both are to any background
# gray (|a - b|^2 < |a - g|^2 + |b - g|^2 with room to spare), so a shape halfway between two colors still reads as
# the shape, not as background. With saturated colors on mid grays zero-shot DDS redraws a recolored shape
# elsewhere, the more the farther apart the two colors (docs/experiments).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.00, 0.45, 0.45),
    "green": (0.45, 0.95, 0.45),
    "blue": (0.45, 0.60, 1.00),
    "yellow": (0.95, 0.90, 0.35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered")
# Background colors: grays only (chroma 0), disjoint from the (chroma >= 0.5) shape colors.
GRAYS: tuple[float, ...] = (0.00, 0.10, 0.20, 0.30)
MIN_GRAY_CONTRAST = 0.19  # the two grays of a texture differ by at least this (0.2 or 0.3): visible texture

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COLOR_ARRAY = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)

CAPTION_TEMPLATE = "a {color} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on an? (\w+) background$")

# Every word the grammar can produce (for the word tokenizer).
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(["a", "on", "background", *COLOR_NAMES, *SHAPES, *BACKGROUNDS])
)


@dataclass(frozen=True)
class Scene:
    """All attributes of one scene; ``render`` turns it into pixels."""

    color: str
    shape: str
    background: str
    cx: float  # shape center, pixels (x = column)
    cy: float
    size: float  # half extent of the shape in pixels (circle radius)
    bg_colors: tuple[float, float]  # the two gray levels of the texture
    stripe_angle: float  # degrees, one of 0/45/90/135
    stripe_period: float  # pixels
    phase: float  # in [0, 1): stripe phase (fraction of period)
    checker_cell: int  # pixels
    checker_offset: tuple[int, int]

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "background": self.background}

    def to_dict(self) -> dict:
        return asdict(self)


def caption(color: str, shape: str, background: str) -> str:
    return CAPTION_TEMPLATE.format(color=color, shape=shape, background=background)


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption`: ``{"color", "shape", "background"}``; ValueError if off-grammar."""
    m = _CAPTION_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    color, shape, background = m.groups()
    if color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(f"unknown attribute in caption: {text!r}")
    return {"color": color, "shape": shape, "background": background}


def all_captions() -> list[str]:
    return [caption(c, s, b) for c in COLOR_NAMES for s in SHAPES for b in BACKGROUNDS]


def sample_scene(seed: int, **overrides) -> Scene:
    """Draw a scene from ``seed``; keyword overrides (e.g. ``color="blue"``) replace attributes
    after drawing, so the rest of the scene is unchanged."""
    rng = np.random.default_rng(int(seed))
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(5.0, 8.5))
    margin = size + 1.5
    cx = float(rng.uniform(margin, SIZE - margin))
    cy = float(rng.uniform(margin, SIZE - margin))
    g1, g2 = rng.choice(len(GRAYS), size=2, replace=False)
    while abs(GRAYS[g1] - GRAYS[g2]) < MIN_GRAY_CONTRAST:  # keep the texture visible
        g1, g2 = rng.choice(len(GRAYS), size=2, replace=False)
    angle = float((0, 45, 90, 135)[rng.integers(4)])
    period = float(rng.uniform(4.0, 8.0))
    phase = float(rng.uniform(0.0, 1.0))
    cell = int(rng.integers(3, 7))
    off = (int(rng.integers(0, cell)), int(rng.integers(0, cell)))
    scene = Scene(
        color=color, shape=shape, background=background, cx=cx, cy=cy, size=size,
        bg_colors=(GRAYS[g1], GRAYS[g2]), stripe_angle=angle, stripe_period=period,
        phase=phase, checker_cell=cell, checker_offset=off,
    )
    if overrides:
        bad = set(overrides) - {"color", "shape", "background"}
        if bad:
            raise ValueError(f"only color/shape/background can be overridden, got {bad}")
        for k, v in overrides.items():
            allowed = {"color": COLOR_NAMES, "shape": SHAPES, "background": BACKGROUNDS}[k]
            if v not in allowed:
                raise ValueError(f"unknown {k}: {v!r}")
        scene = replace(scene, **overrides)
    return scene


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centers


def shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Boolean ``(H, W)`` mask of a shape (pixel centers inside)."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "square":
        h = size * 0.85  # similar area to the circle
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # upward isosceles triangle, apex at top, base at bottom, centred on (cx, cy)
        h = size * 1.1
        top, bottom = cy - h, cy + h
        t = (_YY - top) / (bottom - top)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h * 1.05)
    raise ValueError(f"unknown shape {shape!r}")


def background_image(scene: Scene, kind: str | None = None) -> np.ndarray:
    """``(H, W)`` gray-level texture of the scene (``kind`` defaults to the scene's)."""
    kind = kind or scene.background
    a, b = scene.bg_colors
    if kind == "striped":
        th = np.deg2rad(scene.stripe_angle)
        u = _XX * np.cos(th) + _YY * np.sin(th)
        frac = np.mod(u / scene.stripe_period + scene.phase, 1.0)
        sel = frac < 0.5
    elif kind == "checkered":
        c = scene.checker_cell
        ox, oy = scene.checker_offset
        ix = np.floor((_XX - 0.5 + ox) / c).astype(np.int64)
        iy = np.floor((_YY - 0.5 + oy) / c).astype(np.int64)
        sel = (ix + iy) % 2 == 0
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.where(sel, a, b).astype(np.float32)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(H, W, 3)`` float32 in [0, 1] and the boolean shape mask ``(H, W)``."""
    bg = background_image(scene)
    img = np.repeat(bg[:, :, None], 3, axis=2)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.size)
    img[mask] = np.asarray(COLORS[scene.color], dtype=np.float32)
    return img, mask


def render_scene(seed: int, **overrides) -> dict:
    """Render the scene of ``seed`` (optionally with an attribute changed).

    Returns ``{"image": (H,W,3) float32 in [0,1], "mask": (H,W) bool, "caption": str,
    "color", "shape", "background": str, "position": (cx, cy), "size": float, "scene": Scene}``.
    """
    scene = sample_scene(seed, **overrides)
    img, mask = render(scene)
    return {
        "image": img, "mask": mask, "caption": scene.caption,
        **scene.attributes(), "position": (scene.cx, scene.cy), "size": scene.size,
        "scene": scene,
    }


def render_target(seed: int, **changes) -> dict:
    """The same scene as ``render_scene(seed)`` with ``changes`` applied (e.g. ``color="blue"``)."""
    return render_scene(seed, **changes)


def render_batch(seeds, **overrides) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``(B, H, W, 3)``, masks ``(B, H, W)`` and captions for a list of seeds."""
    imgs, masks, caps = [], [], []
    for s in seeds:
        r = render_scene(int(s), **overrides)
        imgs.append(r["image"])
        masks.append(r["mask"])
        caps.append(r["caption"])
    return np.stack(imgs), np.stack(masks), caps


def to_model(images: np.ndarray):
    """``(B, H, W, 3)`` or ``(H, W, 3)`` in [0, 1] -> torch ``(B, 3, H, W)`` in [-1, 1]."""
    import torch

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def from_model(x) -> np.ndarray:
    """torch ``(B, 3, H, W)`` in [-1, 1] -> numpy ``(B, H, W, 3)`` in [0, 1] (clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()
