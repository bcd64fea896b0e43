"""How often a teacher draws what each caption of the shapes world asks for (the teacher's sampling bar).

Used by ``ddstrans.shapes.eval_teacher`` (the model card's table); the samples are a function of the seed alone: one seeded generator, the captions in :func:`all_captions` order, ``n`` samples
each.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import metrics as M
from .world import all_captions, parse_caption


def sampling_accuracy(teacher, n: int, *, steps: int, guidance: float | Callable[[int], float], seed: int,
                      spacing: str | None = None, eta: float | Callable[[int], float] = 0.0,
                      clip_sample: bool | None = None,
                      on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Per caption: the fraction of ``n`` DDIM samples whose color, shape, background, and color *and* shape are
    the caption's. ``on_row`` sees each row as it is done (progress for a run of minutes)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for cap in all_captions():
        want = parse_caption(cap)
        x = teacher.sample([cap] * n, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                           timestep_spacing=spacing, eta=eta, clip_sample=clip_sample)
        c, s, b = M.classify_color(x), M.classify_shape(x), M.classify_background(x)
        rows.append({
            "caption": cap,
            "color": float(np.mean([v == want["color"] for v in c])),
            "shape": float(np.mean([v == want["shape"] for v in s])),
            "background": float(np.mean([v == want["background"] for v in b])),
            "color_and_shape": float(np.mean([a == want["color"] and v == want["shape"] for a, v in zip(c, s)])),
        })
        if on_row:
            on_row(rows[-1])
    return rows
