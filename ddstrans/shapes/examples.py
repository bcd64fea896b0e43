"""Example inputs of a shapes-world translator: what its exported directory offers (``examples/``, the demo's
examples, the model card's before/after grid).

Why held-out seeds: an example should show what the translator does to a scene it never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping

EXAMPLE_OFFSET = 600_000  # within seeds.HELD_OUT, apart from the renders of scripts/render_shapes.py (500,000 on)


def is_shapes_run(run_config: Mapping | None) -> bool:
    """Whether a training run's resolved config trained on the shapes world (its data module is a shapes one)."""
    data = run_config.get("data") if isinstance(run_config, Mapping) else None
    target = str(data.get("_target_", "")) if isinstance(data, Mapping) else ""
    return target.startswith("ddstrans.shapes.") or "shapes" in target.lower()


def example_images(n: int = 4) -> list:
    """``n`` held-out scenes (``seeds.HELD_OUT``) as PIL images."""
    import numpy as np
    from PIL import Image

    from ddstrans.shapes import render_scene
    from ddstrans.shapes.seeds import HELD_OUT, take

    out = []
    for seed in take(HELD_OUT, EXAMPLE_OFFSET, n):
        img = render_scene(seed)["image"]
        out.append(Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)))
    return out


def examples_for_run(run_config: Mapping | None, n: int = 4) -> list:
    """Held-out scenes for a shapes-world run, none for any other (``export_checkpoint(examples=...)``)."""
    return example_images(n) if is_shapes_run(run_config) else []
