"""Where does a translator lose mask IoU? Per task: the mask pixels it misses and adds, and on which side of the
shape, and the mean shift of the shape's centroid.

Why: at 32x32 a one-pixel error along a shape's outline costs about a quarter of its IoU. A blurred outline misses
and adds pixels evenly; a shape that the teacher's DDS fixed point pushes sideways adds pixels on one side and
misses them on the other, with a centroid shift of consistent sign (small sd over inputs).

    python scripts/diagnose_outline.py checkpoints/shapes_long-<time> --tasks to_blue,to_yellow --n 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddstrans.shapes import metrics as M  # noqa: E402

SIDES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) of the neighbour


def neighbours_outside(masks: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Pixels outside each mask whose neighbour at (-dy, -dx) is inside: the ring on that side of the shape."""
    return M.shift_mask(masks, dy, dx) & ~masks


def centroids(masks: np.ndarray) -> np.ndarray:
    return np.array([np.argwhere(m).mean(0) if m.any() else [np.nan, np.nan] for m in masks])


def outline_report(outputs, target_masks: np.ndarray) -> dict:
    """Per-image means of missed / added mask pixels (and per side), and the centroid shift (y, x) in px."""
    est, gt = M.estimate_mask(M.as_unit(outputs)), np.asarray(target_masks, bool)
    rep = {"iou": float(np.mean([M.mask_iou(e, g) for e, g in zip(est, gt)])),
           "area": float(gt.sum((1, 2)).mean()),
           "missed": float((gt & ~est).sum((1, 2)).mean()), "added": float((est & ~gt).sum((1, 2)).mean())}
    for name, (dy, dx) in SIDES.items():
        ring = neighbours_outside(gt, dy, dx)
        rep[f"added_{name}"] = float((est & ring).sum((1, 2)).mean())
        rep[f"ring_{name}"] = float(ring.sum((1, 2)).mean())
        edge = neighbours_outside(~gt, -dy, -dx)  # mask pixels whose neighbour on that side is outside
        rep[f"missed_{name}"] = float((gt & ~est & edge).sum((1, 2)).mean())
    shift = centroids(est) - centroids(gt)
    rep["shift_y"], rep["shift_x"] = (float(v) for v in np.nanmean(shift, 0))
    rep["shift_sd_y"], rep["shift_sd_x"] = (float(v) for v in np.nanstd(shift, 0))
    return rep


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("translator", type=Path, help="exported translator directory")
    p.add_argument("--tasks", default=None, help="comma-separated; default: the translator's tasks")
    p.add_argument("--n", type=int, default=64, help="held-out inputs per task")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ddstrans.evaluation import build_eval_set, run_method
    from ddstrans.translator import Translator

    tr = Translator.from_pretrained(args.translator)
    known = {t.name: t for t in tr.task_table.tasks}
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(known)
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown task(s) {', '.join(bad)}; the translator has {', '.join(known)}")
    print("| task | IoU | area | missed | added | added left / right / up / down (of ring) "
          "| missed left / right / up / down | centroid shift y, x (sd) px |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        es = build_eval_set(known[name], args.n)
        out, _ = run_method("network", es, translator=tr)
        r = outline_report(out, es.tgt_masks)
        added = " / ".join(f"{r[f'added_{s}']:.1f} ({r[f'ring_{s}']:.1f})" for s in SIDES)
        missed = " / ".join(f"{r[f'missed_{s}']:.1f}" for s in SIDES)
        print(f"| {name} | {r['iou']:.3f} | {r['area']:.0f} | {r['missed']:.1f} | {r['added']:.1f} | {added} | {missed} | "
              f"{r['shift_y']:+.2f} ({r['shift_sd_y']:.2f}), {r['shift_x']:+.2f} ({r['shift_sd_x']:.2f}) |")


if __name__ == "__main__":
    main()
