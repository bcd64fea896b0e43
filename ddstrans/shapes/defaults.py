"""Where the shipped shapes-world teacher lives, and how to load it from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_TEACHER = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes-teacher"


def shapes_teacher_path() -> Path:
    """``DDSTRANS_SHAPES_TEACHER`` if set, else the repository's ``checkpoints/shapes-teacher``."""
    return Path(os.environ.get("DDSTRANS_SHAPES_TEACHER", SHIPPED_TEACHER))


def load_shapes_teacher(path_or_hub_id: str | os.PathLike | None = None, **kwargs):
    """``Teacher.from_pretrained`` of the shapes teacher (``path_or_hub_id`` overrides the default)."""
    from ddstrans.teacher import Teacher

    return Teacher.from_pretrained(path_or_hub_id or shapes_teacher_path(), **kwargs)


SHAPES_TASKS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "shapes.yaml"


def shapes_tasks(config: str | os.PathLike | None = None):
    """The shapes-world tasks of ``configs/tasks/shapes.yaml`` as ``Task`` objects."""
    from omegaconf import OmegaConf

    from ddstrans.tasks import as_tasks

    cfg = OmegaConf.load(config or SHAPES_TASKS_CONFIG)
    return as_tasks(OmegaConf.to_container(cfg.tasks, resolve=True))
