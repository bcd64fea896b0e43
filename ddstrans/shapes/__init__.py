"""The shapes world: a renderer with exact ground truth, captions, and metrics (issue 5)."""

from .world import (
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    GRAYS,
    SHAPES,
    SIZE,
    VOCAB,
    Scene,
    all_captions,
    caption,
    from_model,
    parse_caption,
    render,
    render_batch,
    render_scene,
    render_target,
    sample_scene,
    shape_mask,
    to_model,
)

__all__ = [
    "BACKGROUNDS", "COLOR_NAMES", "COLORS", "GRAYS", "SHAPES", "SIZE", "VOCAB", "Scene",
    "all_captions", "caption", "from_model", "parse_caption", "render", "render_batch",
    "render_scene", "render_target", "sample_scene", "shape_mask", "to_model",
]
