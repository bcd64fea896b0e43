"""Shard lists: patterns -> shard paths, and the ``manifest.json`` files that describe them.

Apart from the streams so that callers that only resolve or count shards (evaluation inputs, the CLI's checks)
need no torch ``Dataset``.
"""

from __future__ import annotations

import glob
import json
import os

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:", "ais://", "hf://")


def _is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def expand_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand brace patterns (``a-{000..009}.tar``), ``::``-separated lists, globs and directories.

    Local shards must exist: a pattern that matches none raises one ``FileNotFoundError`` naming it.
    Remote URLs (http, s3, gs, pipe:...) are passed through unchecked.
    """
    import braceexpand

    if isinstance(urls, str):
        patterns = [u for u in urls.split("::") if u]
    else:
        patterns = [str(u) for u in urls]
    if not patterns:
        raise FileNotFoundError("no shard pattern given (data.urls is empty)")
    out: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.path.expandvars(pattern))
        if _is_remote(pattern):
            out.extend(braceexpand.braceexpand(pattern))
            continue
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        else:
            found = []
            for p in braceexpand.braceexpand(pattern):
                if any(c in p for c in "*?["):
                    found.extend(sorted(glob.glob(p)))
                elif os.path.isfile(p):
                    found.append(p)
        if not found:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        out.extend(found)
    return out


def read_manifests(urls: list[str]) -> list[dict]:
    """The ``manifest.json`` files next to local shards (one per directory), in order of first use."""
    seen: dict[str, dict] = {}
    for u in urls:
        if _is_remote(u):
            continue
        d = os.path.dirname(os.path.abspath(u))
        if d in seen:
            continue
        path = os.path.join(d, "manifest.json")
        try:
            with open(path) as f:
                seen[d] = json.load(f)
                seen[d]["_dir"] = d
        except (OSError, ValueError):
            seen[d] = {}
    return [m for m in seen.values() if m]


def count_samples(urls: list[str]) -> int | None:
    """Samples in these shards according to their manifests (None if any shard is not listed)."""
    per_shard: dict[str, int] = {}
    for m in read_manifests(urls):
        for name, info in (m.get("shards") or {}).items():
            per_shard[os.path.join(m["_dir"], name)] = int(info["count"] if isinstance(info, dict) else info)
    total = 0
    for u in urls:
        n = per_shard.get(os.path.abspath(u)) if not _is_remote(u) else None
        if n is None:
            return None
        total += n
    return total
