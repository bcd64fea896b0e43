"""Which checker pattern does each method draw for ``to_checkered``? Prints, per held-out input, the best-fitting
checker template (cell size and offset, as ``ddstrans.shapes.metrics.checker_r2`` searches them), its r² and the
background the reader sees.

Why: networks trained with DDS erase the stripes but draw no checkers, while per-image DDS draws them. If
per-image DDS settles on a different cell size and offset for each input, the DDS target is ambiguous, and a
deterministic network regressing on it is expected to average the candidates into a flat gray.

    python scripts/diagnose_checkers.py --n 8                                  # per-image DDS
    python scripts/diagnose_checkers.py --n 8 --translator checkpoints/shapes-translator
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddstrans.evaluation import build_eval_set, run_method  # noqa: E402
from ddstrans.shapes import metrics as M  # noqa: E402
from ddstrans.shapes.defaults import load_shapes_teacher, shapes_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out inputs")
    p.add_argument("--translator", type=Path, default=None, help="score this exported network instead of DDS")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--t-max", type=int, default=600)
    args = p.parse_args()
    es = build_eval_set(shapes_task("to_checkered"), args.n)
    if args.translator is not None:
        from ddstrans.translator import Translator

        out, _ = run_method("network", es, translator=Translator.from_pretrained(args.translator))
        label = f"network {args.translator}"
    else:
        edit = dict(steps=args.steps, lr=args.lr, t_range=(50, args.t_max))
        out, _ = run_method("dds", es, teacher=load_shapes_teacher(None), edit_config=edit)
        label = f"per-image DDS ({args.steps} steps, lr {args.lr}, t in [50, {args.t_max}))"
    print(f"{label}: best checker template per input\n")
    print("| input seed | cell (px) | offset (x, y) | r² | background read as |")
    print("|---|---|---|---|---|")
    for seed, img in zip(es.seeds, M.as_unit(out)):
        (cell, ox, oy), r2 = M.checker_fit(img)
        print(f"| {seed} | {cell} | ({ox}, {oy}) | {r2:.2f} | {M.classify_background(img[None])[0]} |")


if __name__ == "__main__":
    main()
