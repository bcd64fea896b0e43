"""Write-then-rename helpers: a crash, a kill or a full disk never leaves a partial file or directory under its
final name.

``atomic_output(path)``: a context manager giving a temp path next to ``path`` (same filesystem, so the final
``os.replace`` is atomic); the temp file is removed on any failure. ``swap_in_directory(new, target)``: replaces a
directory by a complete one built next to it, restoring the old one if the swap fails. ``is_no_space(e)`` tells a
full disk (or quota) from other ``OSError``s, for one clear message.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path``: hidden, and recognisable by ``remove_stale_temps``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_output(p) as tmp: write(tmp)``: on a clean exit ``tmp`` is fsynced and renamed to ``p``;
    on an exception it is deleted and ``p`` is untouched."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.*.tmp-<pid>`` files in ``directory`` left by killed writers (call it while holding the
    directory's lock, so no live writer owns them). Returns what was removed."""
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for p in d.glob(".*.tmp-*"):
        if p.is_file() and p.name.rsplit(".tmp-", 1)[-1].isdigit():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def swap_in_directory(new: Path, target: Path) -> None:
    """Replace ``target`` (absent, or a directory) by the complete directory ``new`` (a sibling): the old one
    is renamed aside, ``new`` renamed in, then the old one deleted; if renaming ``new`` in fails, the old one is
    put back. At every moment ``target`` is either the old directory or the new one (or, for an instant between
    the two renames, absent: never a mixture)."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
