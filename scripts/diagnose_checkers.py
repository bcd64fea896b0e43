"""Which checker pattern does each method draw for ``to_checkered``? Prints, per held-out input, the best-fitting
checker template (cell size and offset, as ``ddstrans.shapes.metrics.checker_r2`` searches them), its r² and the
background the reader sees.

Why: networks trained with DDS erase the stripes but draw no checkers, while per-image DDS draws them. If
per-image DDS settles on a different cell size and offset for each input, the DDS target is ambiguous, and a
deterministic network regressing on it is expected to average the candidates into a flat gray.

    python scripts/diagnose_checkers.py --n 8                                  # per-image DDS
    python scripts/diagnose_checkers.py --n 8 --translator checkpoints/shapes-translator
    python scripts/diagnose_checkers.py --n 8 --translator T --codes 0,1,2,3   # a noise-bank translator, per code
    python scripts/diagnose_checkers.py --n 6 --seeds 0,1,2     # same inputs, different DDS noise: same checker?

With several ``--seeds`` the table has one column per seed: if an input gets the same checker under every seed,
the choice is a function of the input (a network can learn it); if not, the DDS target is ambiguous per input.

    python scripts/diagnose_checkers.py --n 8 --seeds 0,1 --shared-noise   # one noise for every input and step

With ``--shared-noise`` each seed is the seed of one noise tensor that every input uses at every step (as
``loss.shared_noise_prob=1`` in training). Below the table, per seed: of the inputs that got the same cell size, how
many share its most common offset (1.0: the offset follows the noise and the cell size, so a network can learn it).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
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
    p.add_argument("--seeds", default="0", help="comma-separated DDS noise seeds (per-image DDS only)")
    p.add_argument("--codes", default=None,
                   help="comma-separated noise codes of a translator trained with a noise bank: one column per code "
                        "(default: the code it picks per image)")
    p.add_argument("--shared-noise", action="store_true",
                   help="each seed draws one noise tensor that every input uses at every step (per-image DDS only)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    codes = [int(c) for c in args.codes.split(",")] if args.codes else None
    if codes is not None and args.translator is None:
        p.error("--codes are a translator's noise codes: give --translator")
    if args.translator is not None and args.shared_noise:
        p.error("--shared-noise is for per-image DDS; a translator draws no noise")
    if args.translator is not None and len(seeds) > 1:
        p.error("--seeds compares per-image DDS runs; a translator is deterministic (drop --seeds or --translator)")
    es = build_eval_set(shapes_task("to_checkered"), args.n)
    if args.translator is not None:
        from ddstrans.translator import Translator

        tr = Translator.from_pretrained(args.translator)
        if codes is not None and not all(0 <= c < tr.num_noise_codes for c in codes):
            p.error(f"--codes must be in [0, {tr.num_noise_codes}) for this translator")
        outs = [tr.translate_tensor(es.inputs, es.task, noise_codes=c) for c in (codes or [None])]
        label = f"network {args.translator}"
    else:
        teacher = load_shapes_teacher(None)
        outs = [run_method("dds", es, teacher=teacher, edit_config=dict(
            steps=args.steps, lr=args.lr, t_range=(50, args.t_max), seed=s,
            shared_noise_seed=s if args.shared_noise else None))[0] for s in seeds]
        kind = "one shared noise per seed" if args.shared_noise else "noise seeds"
        label = f"per-image DDS ({args.steps} steps, lr {args.lr}, t in [50, {args.t_max}), {kind} {seeds})"
    print(f"{label}: best checker template per input, as cell px @ (x, y) offset, r², background read as\n")
    cols = ([f"code {c}" for c in codes] if codes else [f"seed {s}" for s in seeds] if len(outs) > 1
            else ["best checker"])
    print("| input seed | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    per_method = [M.as_unit(o) for o in outs]
    fits = [[M.checker_fit(imgs[i]) for i in range(len(es.seeds))] for imgs in per_method]
    for i, seed in enumerate(es.seeds):
        cells = []
        for imgs, fit in zip(per_method, fits):
            (cell, ox, oy), r2 = fit[i]
            cells.append(f"{cell} @ ({ox}, {oy}), {r2:.2f}, {M.classify_background(imgs[i][None])[0]}")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print("\noffset agreement among inputs with the same cell size (most common offset / inputs; groups of >= 2):")
    for col, fit in zip(cols, fits):
        print(f"  {col}: {offset_agreement([f[0] for f in fit])}")


def offset_agreement(templates: list[tuple[int, int, int]]) -> str:
    """``cell px: k/n`` per cell size met on at least two inputs: k of its n inputs share the most common offset."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for cell, ox, oy in templates:
        groups.setdefault(cell, []).append((ox, oy))
    parts = [f"{cell} px: {Counter(offs).most_common(1)[0][1]}/{len(offs)}"
             for cell, offs in sorted(groups.items()) if len(offs) >= 2]
    return ", ".join(parts) or "no cell size on two inputs"


if __name__ == "__main__":
    main()
