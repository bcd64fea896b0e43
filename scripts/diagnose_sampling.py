#!/usr/bin/env python
"""Sampling-side levers on the shapes teacher's sampling bar (issue 5: color and shape right in >= 95% of 32
samples for every caption): DDIM timestep spacing, guidance as a function of the timestep, stochastic steps (eta)
and the clamping of each step's predicted clean image.

Draws the same samples as ``scripts/eval_shapes_teacher.py --sample-n N --seed S`` (same noise, one caption after
another; with the defaults, the same numbers) and prints one line: overall fraction right, the worst caption,
captions at the bar, misses. ``--guidance-high G --high-t T`` uses guidance G for timesteps >= T and ``--guidance``
below (a guidance interval); ``--eta-high E`` likewise for eta (stochastic steps only where the layout is open).

    python scripts/diagnose_sampling.py --spacing trailing --seed 0
    python scripts/diagnose_sampling.py --guidance 2 --guidance-high 1 --high-t 500
    python scripts/diagnose_sampling.py --eta 1 --no-clip --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddstrans.shapes.sampling_eval import sampling_accuracy  # noqa: E402
from ddstrans.teacher import Teacher  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="checkpoints/shapes-teacher")
    p.add_argument("--n", type=int, default=32, help="samples per caption")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=None,
                   help="DDIM timestep spacing (default: the teacher scheduler's, 'leading')")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic (the default), 1 adds DDPM's posterior noise at every step (the "
                   "model card's sampler)")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clamp each step's predicted clean image to [-1, 1] (the scheduler config clamps)")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--guidance-high", type=float, default=None, help="guidance for timesteps >= --high-t")
    p.add_argument("--eta-high", type=float, default=None, help="eta for timesteps >= --high-t (--eta below)")
    p.add_argument("--high-t", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the per-caption fractions here")
    return p.parse_args(argv)


def split_at_high_t(low: float, high: float | None, high_t: int):
    """``low`` below timestep ``high_t`` and ``high`` from it on (a constant ``low`` when ``high`` is None)."""
    if high is None:
        return low
    return lambda t: high if t >= high_t else low


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = Teacher.from_pretrained(args.teacher)
    t0 = time.time()
    rows = sampling_accuracy(teacher, args.n, steps=args.steps, seed=args.seed, spacing=args.spacing,
                             guidance=split_at_high_t(args.guidance, args.guidance_high, args.high_t),
                             eta=split_at_high_t(args.eta, args.eta_high, args.high_t),
                             clip_sample=False if args.no_clip else None)
    v = np.array([r["color_and_shape"] for r in rows])
    summary = {"overall": float(v.mean()), "worst": float(v.min()), "at_bar": int((v >= 0.95).sum()),
               "captions": len(v), "misses": int(round(float((1 - v).sum()) * args.n)),
               "minutes": round((time.time() - t0) / 60, 1)}
    print(f"overall {summary['overall']:.2%}, worst caption {summary['worst']:.1%}, captions at >= 95%: "
          f"{summary['at_bar']}/{summary['captions']}, misses {summary['misses']} of {args.n * len(v)} "
          f"({summary['minutes']} min)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
