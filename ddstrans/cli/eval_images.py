"""``ddstrans eval --images DIR`` (or ``--shards``): evaluation on real images with ``ddstrans.metrics``.

Argument parsing and flag names only; the work is ``ddstrans.eval_inputs`` (loading) and ``ddstrans.evaluate``
(methods, metrics, table, grid, plot).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device

FLAGS = {"clip": "--clip", "dino": "--dino", "masks": "--masks", "fid_features": "--fid-features",
         "targets": "--targets", "metrics": "--metrics"}


def add_arguments(p) -> None:
    g = p.add_argument_group("real images (any translator; selected by --images or --shards)")
    g.add_argument("--images", type=Path, default=None, help="folder of input images (NAME.txt beside an image: its caption)")
    g.add_argument("--shards", default=None, help="webdataset shards of input images (brace pattern or glob)")
    g.add_argument("--limit", type=int, default=0, help="evaluate at most this many inputs (0: all)")
    g.add_argument("--resolution", type=int, default=None,
                   help="evaluation size (unset: the translator's, else the teacher's)")
    g.add_argument("--prompt-pair", action="append", default=[], metavar="[NAME=]SOURCE|TARGET",
                   help="a task as a prompt pair (text-conditioned translators and per-image editing); repeatable")
    g.add_argument("--outputs", action="append", default=[], metavar="METHOD=DIR",
                   help="precomputed outputs of another method (e.g. instructpix2pix=DIR), paired with the inputs "
                        "by file name; scored as one more method")
    g.add_argument("--masks", type=Path, default=None,
                   help="edit masks paired by file name (white: may change): enables psnr_background, ssim_background")
    g.add_argument("--targets", action="append", default=[], metavar="[TASK=]DIR",
                   help="target-domain images for fid/kid (one folder for every task, or TASK=DIR per task)")
    g.add_argument("--clip", default=None, help="CLIP model (directory or hub id): clip_target, clip_direction")
    g.add_argument("--dino", default=None, help="DINO/DINOv2 ViT (directory or hub id): dino_structure")
    g.add_argument("--fid-features", default=None,
                   help="feature network for fid/kid: TorchScript Inception file (inception-2015-12-05.pt) or an "
                        "image-encoder directory")
    g.add_argument("--metrics", default=None, help="comma-separated metrics (unset: every one whose model is given)")
    g.add_argument("--kid-subsets", type=int, default=100)
    g.add_argument("--sweep", default=None, metavar="guidance=A,B,...|translators",
                   help="trade-off sweep: per-image editing at each guidance scale, or one point per translator "
                        "(several TRANSLATOR arguments: directories or .ckpt files)")
    g.add_argument("--table", type=Path, default=None, help="also write the markdown table to this file")
    g.add_argument("--plot", type=Path, default=None, help="write the structure vs target-similarity plot (PNG) here")
    g.add_argument("--plot-x", default=None, help="structure metric of the plot (default: lpips or dino_structure)")
    g.add_argument("--plot-y", default=None, help="similarity metric of the plot (default: clip_target)")


def _flag_error(e) -> CLIError:
    flag = FLAGS.get(getattr(e, "param", None) or "")
    msg = str(e)
    if flag:
        msg = msg.replace(f"needs {e.param}:", f"needs {flag}:")
    return CLIError(msg)


def _load_translators(paths, device, teacher_path, tmp) -> list:
    from ddstrans.translator import Translator

    out = []
    for p in paths:
        p = Path(p)
        label = p.stem if p.is_file() else p.name
        if p.is_file() and p.suffix == ".ckpt":
            from ddstrans.export import export_checkpoint

            p = export_checkpoint(p, Path(tmp) / f"{len(out)}-{label}", teacher_path=teacher_path)
        out.append((label, Translator.from_pretrained(p, device=device)))
    return out


def _tasks(args, translator) -> list:
    from ddstrans.tasks import Task

    pairs = []
    for i, spec in enumerate(args.prompt_pair):
        name, _, rest = spec.rpartition("=") if "=" in spec.split("|")[0] else ("", "", spec)
        if "|" not in rest:
            raise CLIError(f"--prompt-pair {spec!r}: write SOURCE|TARGET (optionally NAME=SOURCE|TARGET)")
        src, tgt = (s.strip() for s in rest.split("|", 1))
        pairs.append(Task(name or f"pair{i + 1}", src, tgt))
    if translator is not None and not pairs:
        tasks = list(translator.task_table.tasks)
    elif translator is not None and translator.conditioning != "text":
        raise CLIError("--prompt-pair needs a text-conditioned translator (this one is task-id conditioned: use --tasks)")
    elif pairs:
        tasks = pairs
    else:
        raise CLIError("no tasks: give a translator, or --prompt-pair SOURCE|TARGET for per-image editing")
    if args.tasks:
        known = {t.name: t for t in tasks}
        wanted = [w.strip() for w in args.tasks.split(",") if w.strip()]
        bad = [w for w in wanted if w not in known]
        if bad:
            raise CLIError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(known)}")
        tasks = [known[w] for w in wanted]
    return tasks


def _edit_config(args) -> dict:
    cfg = {}
    from ddstrans.editing import EditConfig

    for key, val in (("steps", args.edit_steps), ("lr", args.edit_lr), ("guidance", args.guidance)):
        if val is not None:
            cfg[key] = val
    if args.edit_t_max is not None:
        cfg["t_range"] = (EditConfig.t_range[0], args.edit_t_max)
    return cfg


def run(args) -> int:
    from ddstrans import evaluate as E
    from ddstrans.eval_inputs import image_files, load_folder, load_paired, load_shards
    from ddstrans.metrics import MetricUnavailable, available_metrics, build_metrics

    if args.images is not None and args.shards is not None:
        raise CLIError("give --images or --shards, not both")
    if args.limit < 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise CLIError("--limit must be >= 0 and --batch-size positive")
    device = pick_device(args.device)
    methods = [m.strip() for m in (args.methods or "identity,network").split(",") if m.strip()]
    precomputed_dirs = {}
    for spec in args.outputs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise CLIError(f"--outputs {spec!r}: write METHOD=DIR")
        precomputed_dirs[name] = folder
        if name not in methods:
            methods.append(name)
    known = {"identity", "network", *E.EDIT_METHODS, *precomputed_dirs}
    bad = [m for m in methods if m not in known]
    if bad:
        raise CLIError(f"unknown method(s) {', '.join(bad)}; choose from identity, network, dds, sds or give "
                       "--outputs METHOD=DIR")
    sweep_guidance = None
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if key == "guidance":
            try:
                sweep_guidance = [float(v) for v in values.split(",") if v.strip()]
            except ValueError:
                raise CLIError(f"--sweep {args.sweep!r}: guidance values must be numbers") from None
            if not sweep_guidance or not any(m in E.EDIT_METHODS for m in methods):
                raise CLIError("--sweep guidance=... needs values and a per-image method (--methods dds or sds)")
        elif key != "translators":
            raise CLIError(f"--sweep {args.sweep!r}: use guidance=A,B,... or translators")
    if len(args.translator) > 1 and args.sweep != "translators":
        raise CLIError("several translators are a sweep: add --sweep translators")

    if args.images is not None:
        image_files(args.images, "--images")  # an empty or missing folder fails before any model loads
    # metric models load before the translator and the teacher: a wrong --clip fails in seconds
    names = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else available_metrics(
        clip=args.clip, dino=args.dino, fid_features=args.fid_features, masks=args.masks is not None,
        targets=bool(args.targets))
    if not names:
        raise CLIError("no metric to compute: give --clip, --dino, --masks or --fid-features with --targets")
    plot_axes = _plot_axes(args, names) if args.plot else None
    try:
        metrics = build_metrics(names, clip=args.clip, dino=args.dino, fid_features=args.fid_features,
                                masks=args.masks is not None, targets=bool(args.targets), kid_subsets=args.kid_subsets)
    except MetricUnavailable as e:
        raise _flag_error(e) from None
    for m in metrics.values():
        m.to(device)

    with tempfile.TemporaryDirectory(prefix="ddstrans-eval-") as tmp:
        translators = _load_translators(args.translator, device, args.teacher, tmp)
        first = translators[0][1] if translators else None
        if "network" in methods and first is None:
            raise CLIError("method 'network' needs a translator directory")
        tasks = _tasks(args, first)
        teacher = None
        if any(m in E.EDIT_METHODS for m in methods):
            from ddstrans.teacher import Teacher

            ref = args.teacher or (first.info.get("teacher_reference") or first.info["teacher"].get("source")
                                   if first is not None else None)
            if not ref:
                raise CLIError("per-image methods need --teacher (no translator recorded one)")
            teacher = Teacher.from_pretrained(ref, device=device)
        resolution = args.resolution or (first.resolution if first is not None else teacher.image_size if teacher else None)
        if args.images is not None:
            inputs = load_folder(args.images, resolution, limit=args.limit, param="--images")
        elif args.shards is not None:
            inputs = load_shards(args.shards, resolution or 512, limit=args.limit, param="--shards")
        else:
            raise CLIError("give --images DIR or --shards PATTERN")
        for path, why in inputs.skipped:
            print(f"skipped {path}: {why}", file=sys.stderr)
        precomputed = {k: load_paired(v, inputs, param=f"--outputs {k}") for k, v in precomputed_dirs.items()}
        masks = load_paired(args.masks, inputs, param="--masks", mask=True) if args.masks else None
        targets = _targets(args.targets, tasks, resolution or int(inputs.pixels.shape[-1]))
        jobs = _jobs(methods, tasks, translators, sweep_guidance, _edit_config(args))
        examples = {} if args.grid else None
        rows = E.evaluate_jobs(inputs, jobs, metrics, teacher=teacher, precomputed=precomputed, masks=masks,
                               targets=(lambda t: targets.get(t.name, targets.get(None))) if targets else None,
                               batch_size=args.batch_size or 8, progress=True,
                               num_examples=args.grid_examples, examples=examples)
    table = E.format_table(rows)
    print(table)
    if args.table:
        _write(args.table, table + "\n")
        print(f"wrote {args.table}")
    from dataclasses import asdict

    from ddstrans.editing import EditConfig

    edit = {k: v for k, v in asdict(EditConfig(**_edit_config(args))).items() if not k.startswith("_")}
    report = {"rows": rows, "skipped": [{"file": f, "reason": r} for f, r in inputs.skipped],
              "inputs": {"images": str(args.images or args.shards), "n": len(inputs),
                         "resolution": int(inputs.pixels.shape[-1])},
              "models": {"clip": args.clip, "dino": args.dino, "fid_features": args.fid_features},
              "edit": edit if any(m in E.EDIT_METHODS for m in methods) else None}
    if args.json:
        _write(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        E.examples_grid(examples).save(args.grid)
        print(f"wrote {args.grid} (per task: input | {' | '.join(r['method'] for r in rows if r['task'] == rows[0]['task'])})")
    if args.plot:
        x, y = plot_axes
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        E.tradeoff_plot(rows, args.plot, structure=x, similarity=y)
        print(f"wrote {args.plot} ({x} vs {y})")
    return 0


def _plot_axes(args, names) -> tuple[str, str]:
    x = args.plot_x or next((k for k in ("lpips", "dino_structure") if k in names), None)
    y = args.plot_y or next((k for k in ("clip_target", "clip_direction") if k in names), None)
    if x is None or y is None or x not in names or y not in names:
        raise CLIError(f"--plot needs a structure and a similarity metric among those computed (x={x}, y={y}); "
                       "give --dino and --clip, or --plot-x/--plot-y")
    return x, y


def _targets(specs, tasks, resolution) -> dict:
    from ddstrans.eval_inputs import load_folder

    out = {}
    names = {t.name for t in tasks}
    for spec in specs:
        task, sep, folder = spec.partition("=")
        if not sep:
            task, folder = None, spec
        elif task not in names:
            raise CLIError(f"--targets {spec!r}: no task {task!r} (tasks: {', '.join(sorted(names))})")
        out[task] = load_folder(folder, resolution, param="--targets").pixels
    missing = [t.name for t in tasks if out and None not in out and t.name not in out]
    if missing:
        raise CLIError(f"--targets gives no target images for task(s) {', '.join(missing)}")
    return out


def _jobs(methods, tasks, translators, sweep_guidance, edit) -> list:
    from ddstrans.evaluate import EDIT_METHODS, Job

    jobs = []
    for task in tasks:
        for m in methods:
            if m == "network":
                for label, tr in translators:
                    if task.name not in tr.tasks and tr.conditioning != "text":
                        raise CLIError(f"translator {label} has no task {task.name!r}")
                    many = len(translators) > 1
                    jobs.append(Job(task, m, translator=tr, sweep=label if many else None))
            elif m in EDIT_METHODS and sweep_guidance:
                jobs.extend(Job(task, m, edit_config={**edit, "guidance": g}, sweep=g) for g in sweep_guidance)
            else:
                jobs.append(Job(task, m, edit_config=edit, translator=translators[0][1] if translators else None))
    return jobs


def _write(path: Path, text: str) -> None:
    """Write-then-rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
