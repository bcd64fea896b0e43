"""``ddstrans``: zero-shot editing, export, single-pass translation, shards and evaluation.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser's ``func``
receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ddstrans.cli.common import CLIError, as_flags, quiet_libraries

# (module, subcommand) — a module missing from an installation is skipped, not fatal.
SUBCOMMANDS = [
    "ddstrans.cli.edit",
    "ddstrans.cli.export",
    "ddstrans.cli.translate",
    "ddstrans.cli.make_shards",
    "ddstrans.cli.eval",
    "ddstrans.cli.demo",
    "ddstrans.cli.card",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddstrans",
        description="Delta Denoising Score image translation: edit one image zero-shot, export a trained "
        "translator, translate images in one forward pass, write training shards, evaluate. "
        "Training itself is `ddstrans-train` (Hydra).",
    )
    parser.add_argument("--debug", action="store_true", help="show full stack traces on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, FileNotFoundError, ValueError, RuntimeError) as e:
        if args.debug or os.environ.get("DDSTRANS_DEBUG"):
            raise
        print(f"error: {as_flags(str(e).splitlines()[0]) if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
