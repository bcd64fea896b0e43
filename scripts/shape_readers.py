#!/usr/bin/env python
"""A shape task's outputs read by the lenient shape reader and by the strict one, per method.

The lenient reader picks whichever shape's area-matched template fits the chroma mask best, so any blob
reads as *something*; the strict reader (the one accuracy uses) also demands that the mask look like the shape
(``ddstrans.shapes.metrics.shape_checks``). Showing both side by side says how many of a translator's "squares"
are squares. Outputs are computed once and cached in ``--cache`` (an ``.npz``), so re-scoring is instant.

    python scripts/shape_readers.py /path/to/translator --teacher /path/to/teacher --n 64 --cache out/readers.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ddstrans.shapes import metrics as M


def outputs(args, methods) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per-method outputs (N, H, W, 3) in [0, 1], inputs, source and target masks, targets."""
    from ddstrans.editing import EditConfig
    from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE, load_shapes_teacher, shapes_task
    from ddstrans.shapes.evaluation import build_eval_set, run_method
    from ddstrans.translator import Translator

    es = build_eval_set(shapes_task(args.task), args.n)
    translator = Translator.from_pretrained(args.translator) if "network" in methods else None
    teacher = load_shapes_teacher(args.teacher) if {"dds", "sds"} & set(methods) else None
    edit = {"steps": args.edit_steps, "lr": args.edit_lr, "guidance": args.guidance or SHAPES_EDIT_GUIDANCE,
            "t_range": (EditConfig.t_range[0], args.edit_t_max)}
    outs = {}
    for m in methods:
        t0 = time.perf_counter()
        y, _ = run_method(m, es, translator=translator, teacher=teacher, edit_config=edit)
        outs[m] = M.as_unit(y)
        print(f"{m}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return outs, M.as_unit(es.inputs), es.src_masks, es.tgt_masks, es.targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("translator", nargs="?", default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--task", default="to_square")
    p.add_argument("--methods", default="identity,network,dds")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--edit-steps", type=int, default=100)
    p.add_argument("--edit-lr", type=float, default=0.02)
    p.add_argument("--edit-t-max", type=int, default=600)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--cache", type=Path, default=None, help="npz of the outputs: written once, then read")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if args.cache is not None and args.cache.is_file():
        z = np.load(args.cache, allow_pickle=False)
        outs = {m: z[f"out_{m}"] for m in methods}
        inputs, src, tgt, targets = z["inputs"], z["src_masks"], z["tgt_masks"], list(z["targets"])
    else:
        outs, inputs, src, tgt, targets = outputs(args, methods)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.cache.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, inputs=inputs, src_masks=src, tgt_masks=tgt, targets=np.array(targets),
                                **{f"out_{m}": o for m, o in outs.items()})
            tmp.replace(args.cache)
    print("| method | n | accuracy (lenient reader) | accuracy (strict reader) | mask IoU with target | kept PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for m, y in outs.items():
        lenient = np.mean([p == t for p, t in zip(M.classify_shape(y, strict=False), targets)])
        strict = np.mean([p == t for p, t in zip(M.classify_shape(y), targets)])
        r = M.evaluate_edit(y, inputs, src, "shape", targets, tgt_masks=tgt)
        print(f"| {m} | {len(y)} | {lenient:.3f} | {strict:.3f} | {r['mask_iou']:.3f} | {r['keep_psnr']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
