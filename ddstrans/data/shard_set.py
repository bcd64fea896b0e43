"""A shard directory and its ``manifest.json``: ``ShardSet`` opens, resumes and closes shards, and keeps the
manifest in step with the shards on disk (rewritten atomically at each closed shard, so it lists only complete
ones). Both writers (``write_from_folder``, ``write_from_teacher``) write through it.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("ddstrans.data")

MANIFEST = "manifest.json"
PATTERN = "shards-%06d.tar"
SHARD_RE = re.compile(r"^shards-(\d{6,})\.tar$")
FORMAT_VERSION = "ddstrans-shards/1"
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def teacher_id(teacher) -> str | None:
    """The teacher's source as recorded in manifests: absolute path for local directories, else the hub id."""
    src = getattr(teacher, "source", None)
    if src is None:
        return None
    return os.path.abspath(os.path.expanduser(src)) if os.path.isdir(os.path.expanduser(src)) else str(src)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def encode_image(im: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpg", "webp") else {}
    if fmt == "jpg":
        kw["subsampling"] = 0 if quality >= 90 else 2
    im.save(buf, format=PIL_FORMATS[fmt], **kw)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted ints -> [[start, end_exclusive], ...]."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    done: set[int] = set()
    for a, b in ranges:
        done.update(range(int(a), int(b)))
    return done


class ShardSet:
    """An output directory of shards plus its manifest; wraps ``webdataset.ShardWriter``.

    ``write(sample, index=None)`` adds a sample; each closed shard is recorded in the manifest
    (count, bytes, and the sample indices it holds) before the next one is opened.
    """

    def __init__(self, out: str | Path, *, maxcount: int = 1000, maxsize: float = 1e9, resume: bool = False,
                 overwrite: bool = False, info: dict | None = None, command: str | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.maxcount, self.maxsize = int(maxcount), float(maxsize)
        path = self.out / MANIFEST
        existing = sorted(p for p in self.out.iterdir() if SHARD_RE.match(p.name))
        if path.exists() or existing:
            if overwrite:
                for p in existing:
                    p.unlink()
                path.unlink(missing_ok=True)
            elif not resume:
                raise FileExistsError(f"{self.out} already holds shards; overwrite=True replaces them")
        self.manifest: dict = self._load(path) if path.exists() else {}
        if not self.manifest:
            self.manifest = {"format": FORMAT_VERSION, "created": _now(), "commands": [], "count": 0,
                             "shards": {}, "skipped": {}, "converted": {}}
        self.manifest.update(info or {})
        if command:
            self.manifest.setdefault("commands", []).append(command)
        # shards on disk that the manifest does not list come from an interrupted run: incomplete, remove
        listed = set(self.manifest["shards"])
        for p in existing:
            if p.exists() and p.name not in listed:
                log.warning("removing %s: not listed in the manifest (left by an interrupted run)", p)
                p.unlink()
        nums = [int(SHARD_RE.match(n).group(1)) for n in listed if SHARD_RE.match(n)]
        self.next_shard = max(nums) + 1 if nums else 0
        self.skipped: Counter[str] = Counter(self.manifest.get("skipped") or {})
        self.converted: Counter[str] = Counter(self.manifest.get("converted") or {})
        self._writer = None
        self._current: list[int] = []
        self.written = 0

    @staticmethod
    def _load(path: Path) -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read {path}: {e}; move it away to start over") from None

    # ---------------------------------------------------------------- bookkeeping
    def done_indices(self) -> set[int]:
        done: set[int] = set()
        for info in self.manifest["shards"].values():
            done |= _from_ranges(info.get("indices", []))
        return done

    def skip(self, reason: str, where: str = "") -> None:
        self.skipped[reason] += 1
        n = sum(self.skipped.values())
        if n <= 20 or n % 100 == 0:
            log.warning("skipped %s: %s (%d skipped so far)", where or "sample", reason, n)

    def save(self) -> None:
        m = self.manifest
        m["skipped"] = dict(self.skipped)
        m["converted"] = dict(self.converted)
        m["count"] = sum(int(s["count"]) for s in m["shards"].values())
        m["num_shards"] = len(m["shards"])
        m["updated"] = _now()
        tmp = self.out / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(m, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, self.out / MANIFEST)

    def _closed(self, fname: str) -> None:
        name = os.path.basename(fname)
        if not self._current:
            Path(fname).unlink(missing_ok=True)
            return
        self.manifest["shards"][name] = {
            "count": len(self._current), "bytes": os.path.getsize(fname), "indices": _ranges(self._current),
        }
        self._current = []
        self.save()

    # ---------------------------------------------------------------- writing
    def write(self, sample: dict, index: int) -> None:
        import webdataset as wds

        if self._writer is None:
            self._writer = wds.ShardWriter(
                str(self.out / PATTERN), maxcount=self.maxcount, maxsize=self.maxsize, post=self._closed,
                start_shard=self.next_shard, verbose=0,
            )
        self._writer.write(sample)  # may close the previous shard first (-> _closed records it)
        self._current.append(index)
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.save()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on error the open shard is incomplete: close it (so the file is valid) but do not list it
        if exc_type is not None and self._writer is not None:
            self._current_backup, self._current = self._current, []
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._writer = None
            self.save()
            return
        self.close()
