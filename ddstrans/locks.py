"""Exclusive lock files: one writer per target (an export directory, a training run directory).

Why lock files and not ``fcntl.flock``: a lock file names its holder (pid and host), so the refusal can say who
holds it, and it works the same on network filesystems where ``flock`` is emulated or absent. It is created by
hard-linking a complete temp file to the lock name (``link`` fails when the name exists, like ``O_EXCL``, on local
filesystems and NFS alike): of two processes exactly one succeeds, and the file is never half-written.

A lock left by a killed process (``kill -9``, a crashed node) is *stale* when it names this host and a pid that no
longer exists; it is then taken over with a message. A lock of another host is never taken over automatically
(its process cannot be checked from here): the message names the file to delete once that process is known dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


class LockedError(RuntimeError):
    """The target is locked by a live process (or one on another host)."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held by an unknown process


class LockFile:
    """``with LockFile(path, what="run directory X"):`` holds ``path`` exclusively or raises ``LockedError``.

    ``what`` names the locked thing in messages. ``acquire()``/``release()`` for longer-lived locks. Releasing
    removes the file only while it still names this process."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False
        self.took_over: dict | None = None

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def _create(self) -> bool:
        """Write our record to a private temp file, then hard-link it to the lock name: ``link`` fails if the name
        exists (exclusive like ``O_EXCL``), and the lock file is never seen half-written."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(self._me(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> LockFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            self.held = True
            return self
        holder = read_lock(self.path)
        if holder is None and self._create():  # released between our two looks
            self.held = True
            return self
        holder = holder or {}
        pid, host = holder.get("pid"), holder.get("host")
        same_host = host == socket.gethostname()
        if isinstance(pid, int) and same_host and not _pid_alive(pid):
            # stale: unlink only the file we read (another process may have taken it over meanwhile)
            if read_lock(self.path) == holder:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            if self._create():
                self.held = True
                self.took_over = holder
                print(f"{self.what}: taking over the stale lock {self.path} of pid {pid} (no longer running)",
                      file=sys.stderr)
                return self
            holder = read_lock(self.path) or {}
            pid, host = holder.get("pid"), holder.get("host")
            same_host = host == socket.gethostname()
        who = f"pid {pid}" + ("" if same_host else f" on host {host}") if pid else "an unknown process"
        hint = "" if same_host else f"; if that process is gone, delete {self.path}"
        raise LockedError(f"{self.what} is in use by {who} (lock {self.path}){hint}")

    def release(self) -> None:
        if self.held:
            self.held = False
            if read_lock(self.path) == self._me():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> LockFile:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def directory_lock(directory: str | os.PathLike, what: str) -> LockFile:
    """The lock of a directory that is rebuilt and swapped in whole (an exported translator): ``.<name>.lock``
    beside it. One naming rule for every writer of the directory (export, card update), so they exclude each other."""
    directory = Path(directory)
    return LockFile(directory.with_name(f".{directory.name}.lock"), what=what)
