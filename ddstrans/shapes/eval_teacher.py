"""Measure a shapes teacher against its quality bar and print a table (the model card's quality section).

1. Conditional sampling: ``--sample-n`` samples per caption (all 24 captions, DDIM, CFG); the
   fraction with the right color, shape, background, and color *and* shape, read by
   ``ddstrans.shapes.metrics`` (bar: color and shape right in >= 95% for every caption).
2. Zero-shot editing of ``--n`` rendered inputs per color task (held-out seeds from ``--start-seed``, the input's color forced
   to the task's source color; source prompt = the input's caption, target prompt = the same caption
   with the target color), with DDS and SDS (``ddstrans.editing.edit_latents``), beside identity:
   target accuracy, mask IoU against the input's ground-truth mask, background PSNR outside it
   ([0, 1] images, dB) and diversity (bar for DDS: >= 90%, >= 0.85, >= 25 dB). Method
   ``dds_from_target`` runs the same DDS edit started at the answer (the scene rendered in the target
   color): a perfect teacher leaves it there (IoU 1); what it loses is the ceiling any DDS-trained
   network inherits from this teacher.

``--write-card`` replaces the quality section of ``<teacher>/README.md`` with the tables.

    python -m ddstrans.shapes.eval_teacher --teacher checkpoints/shapes-teacher --write-card
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddstrans.editing import EditConfig
from ddstrans.shapes import metrics as M
from ddstrans.shapes.card import write_quality
from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE
from ddstrans.shapes.sampling_eval import sampling_accuracy
from ddstrans.shapes.seeds import HELD_OUT
from ddstrans.shapes.world import render_batch, sample_scene, to_model

REF = EditConfig()  # the DDS reference's editing settings: the defaults here
# method -> (score, start at the answer instead of the input)
EDIT_METHODS = {"dds": ("dds", False), "sds": ("sds", False), "dds_from_target": ("dds", True)}
COLOR_TASKS = (("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher directory (default: the shipped shapes teacher)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sample-n", type=int, default=32, help="samples per caption (0 = skip)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (default: the model card's 20)")
    p.add_argument("--sample-guidance", type=float, default=2.0,
                   help="classifier-free guidance (default: the card's 2.0; the pixel-space shapes teacher pushes the "
                   "light colors off the palette at 3 and above)")
    p.add_argument("--sample-eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic, 1 stochastic (DDPM's posterior noise at every step; the model card's "
                   "sampler, which halves the layout errors)")
    p.add_argument("--sample-no-clip", action="store_true",
                   help="do not clamp each step's predicted clean image to [-1, 1] (the scheduler config clamps)")
    p.add_argument("--n", type=int, default=64, help="inputs per color task (0 = skip editing)")
    p.add_argument("--tasks", default=",".join(f"{a}>{b}" for a, b in COLOR_TASKS))
    p.add_argument("--methods", default="dds,sds", help="comma-separated, of: dds, sds, dds_from_target (DDS started "
                   "at the ground-truth answer: how far a perfect edit drifts under this teacher; 0 drift is ideal)")
    p.add_argument("--steps", type=int, default=REF.steps)
    p.add_argument("--lr", type=float, default=REF.lr, help="SGD lr on loss_scale x surrogate ('hw' reduction)")
    p.add_argument("--loss-scale", type=float, default=REF.loss_scale)
    p.add_argument("--guidance", type=float, default=REF.guidance,
                   help="DDS/SDS classifier-free guidance (default: the SD reference's, as --steps, --lr and the t range "
                   f"here; the card passes its own settings, guidance {SHAPES_EDIT_GUIDANCE:g})")
    p.add_argument("--guidance-low-t", type=int, default=0, help="steps with t below this use --guidance-low (0: off)")
    p.add_argument("--guidance-low", type=float, default=1.0)
    p.add_argument("--t-min", type=int, default=REF.t_range[0])
    p.add_argument("--t-max", type=int, default=REF.t_range[1])
    p.add_argument("--t-end", default="", help="anneal the range linearly to 'T_MIN,T_MAX' over the edit (e.g. 20,200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-seed", type=int, default=HELD_OUT.start,
                   help="first scene seed of the editing inputs (task k uses 1000 k more); default: the first of "
                   "ddstrans.shapes.seeds.HELD_OUT, scenes no model trained on")
    p.add_argument("--grid", default="", help="write a PNG grid of the first 8 edits per task here")
    p.add_argument("--json", default="", help="write all figures as JSON here")
    p.add_argument("--write-card", action="store_true")
    args = p.parse_args(argv)
    try:
        args.t_range_end = tuple(int(v) for v in args.t_end.split(",")) if args.t_end else None
    except ValueError:
        p.error(f"--t-end {args.t_end!r}: expected two integers 'T_MIN,T_MAX'")
    if args.t_range_end is not None and len(args.t_range_end) != 2:
        p.error(f"--t-end {args.t_end!r}: expected two integers 'T_MIN,T_MAX'")
    return args


def eval_sampling(teacher, args):
    def show(r):
        print(f"  {r['caption']:45s} color {r['color']:.2f} shape {r['shape']:.2f} bg {r['background']:.2f}", flush=True)

    return sampling_accuracy(teacher, args.sample_n, steps=args.sample_steps, guidance=args.sample_guidance,
                             seed=args.seed, eta=args.sample_eta,
                             clip_sample=False if args.sample_no_clip else None, on_row=show)


def task_inputs(src: str, tgt: str, n: int, offset: int):
    """Inputs in the source color, their masks and captions, the target captions, and the answers (the same
    scenes rendered in the target color)."""
    seeds = list(range(offset, offset + n))
    imgs, masks, caps = render_batch(seeds, color=src)
    tcaps = [sample_scene(s, color=tgt).caption for s in seeds]
    return imgs, masks, caps, tcaps, render_batch(seeds, color=tgt)[0]


def eval_editing(teacher, args):
    from ddstrans.editing import edit_latents

    results, grids = [], []
    tasks = [tuple(t.split(">")) for t in args.tasks.split(",") if t]
    for k, (src, tgt) in enumerate(tasks):
        imgs, masks, caps, tcaps, answers = task_inputs(src, tgt, args.n, offset=args.start_seed + 1000 * k)
        x = to_model(imgs)
        outs = {"identity": (x, 0.0)}
        emb_s, emb_t = teacher.encode_prompts(caps), teacher.encode_prompts(tcaps)
        z_src = teacher.encode_images(x)
        for method in [m for m in args.methods.split(",") if m]:
            if method not in EDIT_METHODS:
                raise SystemExit(f"unknown method {method!r}; choose from {', '.join(EDIT_METHODS)}")
            cfg = EditConfig(steps=args.steps, lr=args.lr, guidance=args.guidance, loss_scale=args.loss_scale,
                             t_range=(args.t_min, args.t_max), t_range_end=args.t_range_end,
                             method=EDIT_METHODS[method][0], seed=args.seed, guidance_low_t=args.guidance_low_t,
                             guidance_low=args.guidance_low)
            z_init = teacher.encode_images(to_model(answers)) if EDIT_METHODS[method][1] else None
            t0 = time.time()
            z = edit_latents(teacher, z_src, emb_s, emb_t, cfg, z_init=z_init)
            outs[method] = (teacher.decode_latents(z), (time.time() - t0) / len(x))
        for name, (y, sec) in outs.items():
            r = M.evaluate_edit(y, imgs, masks, "color", tgt)
            r.update(task=f"{src}->{tgt}", method=name, sec_per_image=sec)
            results.append(r)
            print(f"  {src:>6s}->{tgt:<6s} {name:8s} acc {r['target_acc']:.3f} iou {r['mask_iou']:.3f} "
                  f"psnr {r['keep_psnr']:.1f} div {r['diversity']:.2f} ({sec:.2f} s/img)", flush=True)
        grids.append([M.as_unit(outs[m][0][:8]) for m in outs])
    return results, grids


def save_grid(grids, path):
    from PIL import Image

    rows = []
    for task in grids:
        for imgs in task:
            rows.append(np.concatenate(list(imgs), axis=1))
    g = np.concatenate(rows, axis=0)
    Image.fromarray((g * 255).round().astype(np.uint8)).resize((g.shape[1] * 4, g.shape[0] * 4), Image.NEAREST).save(path)


def tables(args, sampling, editing, wall):
    lines = []
    cmd = "python -m ddstrans.shapes.eval_teacher " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines.append(f"Measured by `{cmd}` ({wall / 60:.1f} min, {args.threads} CPU thread(s)).\n")
    if sampling:
        cs = [r["color_and_shape"] for r in sampling]
        lines.append(f"**Conditional sampling** ({args.sample_n} samples per caption, DDIM {args.sample_steps} steps"
                     f"{f', eta {args.sample_eta:g}' if args.sample_eta else ''}"
                     f"{', no clamping of the predicted clean image' if args.sample_no_clip else ''}, guidance {args.sample_guidance}; bar: color and shape right in >= 95% for each caption): "
                     f"color and shape right in {np.mean(cs):.1%} overall, worst caption {min(cs):.1%}; "
                     f"captions meeting the bar: {sum(c >= 0.95 for c in cs)}/{len(cs)}.\n")
        lines.append("| caption | color | shape | background | color and shape |")
        lines.append("|---|---|---|---|---|")
        for r in sampling:
            lines.append(f"| {r['caption']} | {r['color']:.2f} | {r['shape']:.2f} | {r['background']:.2f} | {r['color_and_shape']:.2f} |")
        lines.append("")
    if editing:
        lines.append(f"**Zero-shot editing** ({args.n} rendered inputs per task; SGD lr {args.lr} on {args.loss_scale:g} x "
                     f"surrogate loss (raw-gradient step {args.lr * args.loss_scale / 1024:.3f}), {args.steps} steps, "
                     f"guidance {args.guidance}"
                     f"{f' ({args.guidance_low} for t < {args.guidance_low_t})' if args.guidance_low_t else ''}, t in [{args.t_min}, {args.t_max})"
                     f"{f' annealed to [{args.t_range_end[0]}, {args.t_range_end[1]})' if args.t_range_end else ''}; bar for DDS: target accuracy >= 0.90, "
                     f"mask IoU >= 0.85, background PSNR >= 25 dB; images in [0, 1]).\n")
        lines.append("| task | method | target acc | mask IoU | bg PSNR (dB) | diversity | s/image |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in editing:
            lines.append(f"| {r['task']} | {r['method']} | {r['target_acc']:.3f} | {r['mask_iou']:.3f} | "
                         f"{r['keep_psnr']:.1f} | {r['diversity']:.2f} | {r['sec_per_image']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ddstrans import Teacher

    t0 = time.time()
    from ddstrans.shapes.defaults import shapes_teacher_path

    args.teacher = str(args.teacher or shapes_teacher_path())
    teacher = Teacher.from_pretrained(args.teacher)
    sampling = eval_sampling(teacher, args) if args.sample_n > 0 else []
    editing, grids = eval_editing(teacher, args) if args.n > 0 else ([], [])
    text = tables(args, sampling, editing, time.time() - t0)
    print(text)
    if args.grid and grids:
        save_grid(grids, args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps({"sampling": sampling, "editing": editing, "args": vars(args)}, indent=2))
    if args.write_card:
        write_quality(Path(args.teacher), text)


if __name__ == "__main__":
    main()
