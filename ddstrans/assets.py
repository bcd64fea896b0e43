"""Files shipped with ddstrans: the Hydra configs and the shapes-world teacher.

They live at the top of the repository (``configs/``, ``checkpoints/shapes-teacher/``), where a reader of the source
expects them. A wheel cannot hold files outside its packages, so the build (``setup.py``) copies them into
``ddstrans/_assets/``. This module finds them in either place, so the same code runs from an installed wheel, an
editable install and a plain checkout on ``PYTHONPATH``, from any working directory.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# Inside an installed wheel (written by setup.py's build step; never in a checkout: .gitignore'd).
PACKAGED_DIR = _PACKAGE / "_assets"
# Where each asset sits in a source checkout, relative to the repository root.
CHECKOUT_PATHS = {
    "configs": "configs",
    "shapes-teacher": "checkpoints/shapes-teacher",
}


def asset_path(name: str) -> Path:
    """The directory of the shipped asset ``name`` (one of ``CHECKOUT_PATHS``).

    The packaged copy wins over a checkout's: next to an installed package, ``site-packages/configs`` could be
    another distribution's folder."""
    if name not in CHECKOUT_PATHS:
        raise ValueError(f"unknown asset {name!r}; ddstrans ships {', '.join(sorted(CHECKOUT_PATHS))}")
    candidates = (PACKAGED_DIR / name, _PACKAGE.parent / CHECKOUT_PATHS[name])
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"ddstrans asset {name!r} not found (looked in {candidates[0]} and {candidates[1]}); "
        "reinstall ddstrans (pip install <repo>) or run from a full checkout")


def configs_dir() -> Path:
    """The Hydra config directory of ``ddstrans-train`` (``configs/`` of the repository)."""
    return asset_path("configs")


def shapes_teacher_dir() -> Path:
    """The shipped shapes-world teacher (``checkpoints/shapes-teacher`` of the repository)."""
    return asset_path("shapes-teacher")
