"""Turning what goes wrong in a training run into one line for the user.

Hydra wraps any exception raised while instantiating a ``_target_`` in ``InstantiationException`` ("Error in call
to target ..."), with the real error as its cause; a bad config value (``data.image_size=0``) surfaces as a
``TypeError``/``ValueError`` deep inside a library. These helpers unwrap and name the config key, so
``ddstrans-train`` can print ``error: ...`` and exit with status 2 instead of a stack trace.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from ddstrans.io_safety import is_no_space
from ddstrans.validation import ConfigError


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: BaseException) -> BaseException:
    from hydra.errors import InstantiationException

    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def instantiate_teacher(node: DictConfig):
    """``hydra.utils.instantiate(cfg.teacher)`` raising ``TeacherLoadError`` (one line) for any failure to load it:
    a missing or corrupt file, a truncated safetensors, a hub id that cannot be fetched."""
    import hydra

    from ddstrans.teacher import TeacherLoadError

    try:
        return hydra.utils.instantiate(node)
    except Exception as e:  # noqa: BLE001
        cause = _cause(e)
        if isinstance(cause, (TeacherLoadError, ConfigError)):
            raise cause from None
        if is_no_space(cause):
            raise
        raise TeacherLoadError(f"cannot load the teacher ({node.get('_target_')}): {type(cause).__name__}: "
                               f"{first_line(cause)}") from cause


def instantiate_checked(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate(node)``; a failure in the constructor (a value it rejects, an argument it does not
    take) becomes ``ConfigError`` naming ``key``."""
    import hydra

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001
        cause = _cause(e)
        if isinstance(cause, ConfigError) or is_no_space(cause):
            raise cause from None
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(cause, MissingMandatoryValue):
            k = getattr(cause, "full_key", None) or key
            raise ConfigError(f"{k} is required (it is '???' in the config): pass {k}=...") from None
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        raise ConfigError(f"{key} ({target}): {type(cause).__name__}: {first_line(cause)}") from cause


def os_error_line(e: OSError) -> str:
    """``no space left on <dir>`` for a full disk, else the error's own words with the file it names."""
    where = e.filename or ""
    if is_no_space(e):
        d = os.path.dirname(str(where)) or str(where) or "the output device"
        return f"no space left on {d} ({e.strerror or 'No space left on device'})"
    return f"{e.strerror or first_line(e)}" + (f": {where}" if where else "")
