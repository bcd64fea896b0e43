"""``ddstrans card``: write ``ddstrans eval`` results into an exported translator's model card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddstrans.cli.common import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "card",
        help="put evaluation results into a translator's model card (README.md)",
        description="Rewrite the evaluation section of TRANSLATOR/README.md with the rows of `ddstrans eval "
        "--json FILE`, and the card's sha256 in translator.json (the directory is verified first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("translator", type=Path, help="exported translator directory")
    p.add_argument("--eval", type=Path, required=True, dest="eval_json", help="JSON written by `ddstrans eval --json`")
    p.set_defaults(func=run)


def run(args) -> int:
    from ddstrans.model_card import update_card_eval
    from ddstrans.translator import TranslatorLoadError

    try:
        rows = json.loads(args.eval_json.read_text())
    except FileNotFoundError:
        raise CLIError(f"--eval: {args.eval_json} does not exist") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"--eval: {args.eval_json} is not JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CLIError(f"--eval: {args.eval_json} is not a list of rows as `ddstrans eval --json` writes")
    try:
        card = update_card_eval(args.translator, rows)
    except TranslatorLoadError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {len(rows)} evaluation row(s) into {card}")
    return 0
