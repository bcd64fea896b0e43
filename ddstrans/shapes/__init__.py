"""The embedded shapes world: a renderer with exact ground truth, captions, metrics, data, evaluation, seeds and
the teacher's training (``python -m ddstrans.shapes.train_teacher``)."""

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
