"""``ddstrans eval``: a table of identity, the exported network, per-image DDS and SDS editing.

Without ``--images``/``--shards`` it is the shapes world's exact evaluation (rendered held-out scenes and the
renderer's ground truth); with them, real images scored by ``ddstrans.metrics`` (``ddstrans.cli.eval_images``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device
from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE, SHAPES_EDIT_T_MAX


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a translator: on real images (--images/--shards; CLIP, DINO structure, FID/KID ...) or on "
             "held-out shapes-world inputs (accuracy, IoU, PSNR, diversity, time)",
        description="Real images (--images DIR or --shards): for every task, score identity, the exported network, "
        "per-image DDS/SDS editing and precomputed outputs (--outputs) with the metrics whose models are given "
        "(--clip, --dino, --fid-features with --targets, --masks); mean +- 95% CI per metric. Shapes world (no "
        "--images): render N held-out scenes that each task changes and score with the renderer's ground truth. "
        "Prints a markdown table; --json writes the rows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("translator", type=Path, nargs="*",
                   help="exported translator directory (omit with --methods dds,sds); several (or .ckpt files) with "
                        "--sweep translators")
    p.add_argument("--teacher", default=None, help="teacher for DDS/SDS editing; unset: the shipped shapes teacher")
    p.add_argument("--tasks", default=None, help="comma-separated task names; unset: all of the translator's. A text-conditioned translator (and "
                   "per-image editing) also takes shapes-world tasks it was not trained on, e.g. to_yellow, a color "
                   "pair like red_to_yellow, or two edits at once joined by '+' like to_blue+to_square: the "
                   "generalisation test")
    p.add_argument("--n", type=int, default=64, help="held-out inputs per task")
    p.add_argument("--held-out-offset", type=int, default=0,
                   help="shapes world: start that many seeds into the held-out range (0: the usual inputs); a "
                        "second set on which to check a checkpoint chosen on the first")
    p.add_argument("--validation", action="store_true",
                   help="shapes world: score the validation inputs (the ones training's shapes metrics log, which "
                        "the held-out evaluation never uses) instead: to choose among checkpoints on inputs the "
                        "reported figures do not use; --held-out-offset then counts into the validation range")
    p.add_argument("--methods", default=None, help="comma-separated subset of identity,answer,network,routed,dds,sds (answer: the renderer's "
                   "ground-truth edit, the scores of a perfect translation; routed: the network reaching each pair "
                   "through its trained caption rewrites, one pass each, text translators; both shapes only). Unset: identity,network,dds,sds "
                   "on the shapes world, identity,network on real images")
    p.add_argument("--edit-steps", type=int, default=None,
                   help="steps of per-image editing (unset: 100 on the shapes world, EditConfig's 200 on real images)")
    p.add_argument("--edit-lr", type=float, default=None,
                   help="SGD lr on 2000 x the surrogate loss (unset: 0.02 on the shapes world; the SD reference 0.1 "
                        "on real images — on the pixel-space shapes teacher 0.1 overshoots: background PSNR ~15 dB)")
    p.add_argument("--edit-t-max", type=int, default=None,
                   help=f"per-image editing samples t in [50, edit-t-max) (unset: {SHAPES_EDIT_T_MAX} on the shapes world, 950 on real images)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"CFG scale of per-image editing (unset: {SHAPES_EDIT_GUIDANCE} on the shapes world, "
                        "ddstrans.shapes.defaults.SHAPES_EDIT_GUIDANCE: the shipped shapes teacher's setting, as higher "
                        "guidance amplifies its errors and loses outlines; EditConfig's default on real images)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per batch (unset: 64 shapes, 8 real images)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--grid", type=Path, default=None,
                   help="write a before/after PNG here: per task, rows of input | output of each method")
    p.add_argument("--grid-examples", type=int, default=4, help="inputs per task in the grid")
    from ddstrans.cli import eval_images

    eval_images.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.images is not None or args.shards is not None:
        from ddstrans.cli import eval_images

        return eval_images.run(args)
    if len(args.translator) > 1:
        raise CLIError("several translators (a sweep) need real images: --images DIR or --shards PATTERN")
    args.translator = args.translator[0] if args.translator else None
    for key, default in (("methods", "identity,network,dds,sds"), ("edit_steps", 100), ("edit_lr", 0.02),
                         ("edit_t_max", SHAPES_EDIT_T_MAX), ("guidance", SHAPES_EDIT_GUIDANCE), ("batch_size", 64)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    try:
        return run_shapes(args)
    except ValueError as e:
        if "not a shapes-world caption" not in str(e):
            raise
        raise CLIError(f"{e}: without --images or --shards, eval renders the shapes world; evaluate a translator of "
                       "other images on real ones (--images DIR or --shards PATTERN, see docs/evaluation.md)") from None


def run_shapes(args) -> int:
    from ddstrans.editing import EditConfig
    from ddstrans.shapes.evaluation import METHODS, evaluate, format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise CLIError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if args.n <= 0 or args.edit_steps <= 0:
        raise CLIError("--n and --edit-steps must be positive")
    from ddstrans.shapes.seeds import HELD_OUT, VALIDATION

    seed_range = VALIDATION if args.validation else HELD_OUT
    if not 0 <= args.held_out_offset < len(seed_range):
        raise CLIError(f"--held-out-offset {args.held_out_offset}: must be in [0, {len(seed_range)})"
                       + (" with --validation" if args.validation else ""))
    if not 50 < args.edit_t_max <= 1000:
        raise CLIError(f"--edit-t-max {args.edit_t_max}: must be in (50, 1000]")
    device = pick_device(args.device)
    translator = teacher = None
    if args.translator is not None:
        from ddstrans.translator import Translator

        translator = Translator.from_pretrained(args.translator, device=device)
        tasks = translator.task_table.tasks
        if "routed" in methods and translator.conditioning != "text":
            raise CLIError("method 'routed' needs a text-conditioned translator")
    elif "network" in methods or "routed" in methods:
        raise CLIError("methods network and routed need a translator directory")
    if any(m in methods for m in ("dds", "sds")):
        from ddstrans.shapes.defaults import load_shapes_teacher

        teacher = load_shapes_teacher(args.teacher, device=device)
    if translator is None:
        from ddstrans.shapes.defaults import shapes_tasks

        tasks = shapes_tasks()
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",")]
        known = {t.name: t for t in tasks}
        any_task = translator is None or translator.conditioning == "text"  # any prompt pair can be asked for
        picked = []
        for w in wanted:
            if w in known:
                picked.append(known[w])
                continue
            if not any_task:
                raise CLIError(f"unknown task {w!r}; this task-id translator knows: {', '.join(known)}")
            from ddstrans.shapes.defaults import shapes_task

            try:
                picked.append(shapes_task(w))
            except ValueError as e:
                raise CLIError(str(e)) from None
        tasks = picked
    edit = {"steps": args.edit_steps, "lr": args.edit_lr, "guidance": args.guidance,
            "t_range": (EditConfig.t_range[0], args.edit_t_max)}
    examples = {} if args.grid else None
    rows = evaluate(tasks, args.n, methods, translator=translator, teacher=teacher, edit_config=edit,
                    batch_size=args.batch_size, progress=True, examples=examples, num_examples=args.grid_examples,
                    held_out_offset=args.held_out_offset, seed_range=seed_range)
    print(format_table(rows))
    if args.grid:
        from ddstrans.shapes.evaluation import examples_grid

        args.grid.parent.mkdir(parents=True, exist_ok=True)
        examples_grid(examples, methods).save(args.grid)
        print(f"wrote {args.grid} (per task: input | {' | '.join(methods)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
