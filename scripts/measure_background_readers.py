#!/usr/bin/env python
"""Margins of the background readers (``ddstrans.shapes.metrics``) on renders of the current world.

The two readers decide "striped" and "checkered" by thresholds (``BACKGROUND_RATIO_THRESHOLD``,
``CHECKER_R2_THRESHOLD``); this prints how far clean, noisy and blurred renders are from them, the figures the
metrics docstring quotes. Pure numpy, seconds:

    python scripts/measure_background_readers.py              # 2,000 renders for the stripe ratio, 400 for the rest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddstrans.shapes import metrics as M  # noqa: E402
from ddstrans.shapes import render_batch  # noqa: E402


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (B, H, W, C) images, radius 3 sigma, wrapping at the borders."""
    r = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)
    k = np.exp(-r**2 / (2 * sigma**2))
    k /= k.sum()
    rows = sum(w * np.roll(images, int(d), axis=1) for d, w in zip(r, k))
    return sum(w * np.roll(rows, int(d), axis=2) for d, w in zip(r, k))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-ratio", type=int, default=2000, help="checkered renders for the stripe ratio")
    p.add_argument("--n", type=int, default=400, help="renders per kind for the checker fit")
    p.add_argument("--noise", type=float, default=0.1, help="sd of the added pixel noise")
    p.add_argument("--blur", type=float, default=0.8, help="sigma of the Gaussian blur, pixels")
    args = p.parse_args(argv)

    ck, ckm, _ = render_batch(range(args.n_ratio), background="checkered")
    ratio = max(M.background_ratio(x, m) for x, m in zip(ck, ckm))
    ck, ckm = ck[: args.n], ckm[: args.n]
    st, stm, _ = render_batch(range(args.n), background="striped")
    noisy = np.clip(ck + np.random.default_rng(0).normal(0, args.noise, ck.shape), 0, 1)
    rows = [
        (f"stripe ratio of checkers ({args.n_ratio}), max", ratio, f"striped above {M.BACKGROUND_RATIO_THRESHOLD}"),
        *[(f"checker fit of checkers, {name} ({args.n}), min", min(M.checker_r2(x, m) for x, m in zip(xs, ckm)),
           f"checkered above {M.CHECKER_R2_THRESHOLD}")
          for name, xs in (("clean", ck), (f"noise sd {args.noise}", noisy),
                           (f"blur {args.blur} px", gaussian_blur(ck, args.blur)))],
        (f"checker fit of stripes ({args.n}), max", max(M.checker_r2(x, m) for x, m in zip(st, stm)),
         f"checkered above {M.CHECKER_R2_THRESHOLD}"),
    ]
    print("| measure | value | reader's rule |\n|---|---|---|")
    for name, value, rule in rows:
        print(f"| {name} | {value:.3f} | {rule} |")


if __name__ == "__main__":
    main()
