"""Which image files a command was given: files, folders, glob patterns, or ``-`` for a list on stdin.

Why here and not in the CLI: scripts and the demo's batch tab take the same kinds of input lists.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

GLOB_CHARS = set("*?[")


def expand_inputs(items: Iterable[str | Path], stdin: TextIO | None = None) -> list[Path]:
    """Files in the order given: a folder becomes its image files (sorted), a pattern with ``* ? [`` the files
    it matches (sorted; ``**`` recurses), ``-`` the newline-separated paths read from ``stdin`` (blank lines and
    lines starting with ``#`` ignored). Other paths are kept as they are (a missing file is reported when read)."""
    from ddstrans.images import IMAGE_SUFFIXES

    def images_in(d: Path) -> list[Path]:
        return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)

    out: list[Path] = []
    for item in items:
        s = str(item)
        if s == "-":
            stream = stdin if stdin is not None else sys.stdin
            lines = [ln.strip() for ln in stream.read().splitlines()]
            out += expand_inputs([ln for ln in lines if ln and not ln.startswith("#")])
        elif Path(s).is_dir():
            out += images_in(Path(s))
        elif GLOB_CHARS & set(s) and not Path(s).exists():
            out += sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
        else:
            out.append(Path(s))
    return out
