"""Where the shipped shapes-world teacher lives, and how to load it from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

# Classifier-free guidance of per-image DDS/SDS editing with the shipped teacher (its card). Lower than the DDS
# reference's (ddstrans.guidance.Guidance): guidance amplifies this small pixel-space teacher's errors, and at the
# reference scale its edits lose the outline (the card's guidance table).
SHAPES_EDIT_GUIDANCE = 3.0
# Largest timestep of per-image editing on the shapes world (t in [50, 600)): the evaluation's range, where the
# card's editing settings were measured.
SHAPES_EDIT_T_MAX = 600


def shapes_teacher_path() -> Path:
    """``DDSTRANS_SHAPES_TEACHER`` if set, else the shipped ``checkpoints/shapes-teacher`` (``ddstrans.assets``)."""
    env = os.environ.get("DDSTRANS_SHAPES_TEACHER")
    if env:
        return Path(env)
    from ddstrans.assets import shapes_teacher_dir

    return shapes_teacher_dir()


def load_shapes_teacher(path_or_hub_id: str | os.PathLike | None = None, **kwargs):
    """``Teacher.from_pretrained`` of the shapes teacher (``path_or_hub_id`` overrides the default)."""
    from ddstrans.teacher import Teacher

    return Teacher.from_pretrained(path_or_hub_id or shapes_teacher_path(), **kwargs)


def shapes_tasks(config: str | os.PathLike | None = None):
    """The shapes-world tasks of ``configs/tasks/shapes.yaml`` as ``Task`` objects."""
    from omegaconf import OmegaConf

    from ddstrans.assets import configs_dir
    from ddstrans.tasks import as_tasks

    cfg = OmegaConf.load(config or configs_dir() / "tasks" / "shapes.yaml")
    return as_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))


def color_pair_task(source_color: str, target_color: str):
    """The task ``<source>_to_<target>``: recolor shapes of ``source_color`` only (others: no change asked)."""
    from ddstrans.shapes.world import COLOR_NAMES
    from ddstrans.tasks import Task

    for c in (source_color, target_color):
        if c not in COLOR_NAMES:
            raise ValueError(f"unknown color {c!r}; the shapes world has {', '.join(COLOR_NAMES)}")
    if source_color == target_color:
        raise ValueError(f"a color pair needs two different colors, got {source_color!r} twice")
    return Task(f"{source_color}_to_{target_color}", "{caption}", "{caption}",
                rewrite={"pattern": rf"\b{source_color}\b", "replacement": target_color})


def shapes_task(name: str):
    """A shapes-world task by name: one of ``configs/tasks/shapes.yaml``, a color pair ``<color>_to_<color>``, or
    a composition of such tasks joined by ``+`` (``to_blue+to_square``: both rewrites at once, an edit of two
    attributes)."""
    from ddstrans.tasks import Task

    if "+" in name:
        parts = [shapes_task(p.strip()) for p in name.split("+")]
        if len(parts) < 2 or any(p.source != ["{caption}"] or not p.rewrites for p in parts):
            raise ValueError(f"task {name!r}: a composition joins two or more caption-rewrite tasks with '+'")
        return Task(name, "{caption}", "{caption}", rewrite=[r for p in parts for r in p.rewrites])
    known = {t.name: t for t in shapes_tasks()}
    if name in known:
        return known[name]
    parts = name.split("_to_")
    if len(parts) == 2:
        return color_pair_task(*parts)
    raise ValueError(f"unknown shapes task {name!r}: use one of {', '.join(known)}, a color pair like red_to_yellow, "
                     "or tasks joined by '+' (to_blue+to_square)")