#!/usr/bin/env python
"""Translation quality on the shapes world: the single-pass network vs per-image DDS/SDS editing, and ablations.

For each variant (a set of Hydra overrides of ``experiment=shapes``) this trains a translator, exports it and
scores it on held-out inputs; per-image DDS and SDS editing of the same inputs run beside it. Results are
aggregated per task family (color / shape / background) into one markdown table, written to
``OUT/quality.md`` and ``OUT/quality.json``, and printed. Times are measured in this run, on the machine it runs on.

    python scripts/bench_quality.py                       # the README's table: 2 h 2 min on 2 cores
    python scripts/bench_quality.py --variants main,no_warmup --steps 300 --n 32 --edit-n 8

Variants, each an experiment config: main (experiment=shapes: DDS, CFG warm-up, task-id, EMA, and beyond the paper
an identity term on regions the DDS score does not call to change), no_warmup, sds, text (text conditioning),
no_ema, unseen (text conditioning trained on four color pairs, evaluated on those and on four pairs never trained),
no_identity (the paper's loss alone); on request long (experiment=shapes_long: 2,000 steps), long_palette
(beyond the paper: long, then 1,000 steps with a palette term on the background change) and long_sharp (long to
3,500 steps, the last 500 at guidance 1.5: the cleanest squares); see
configs/experiment/shapes_*.yaml.
Without ``--steps`` each variant trains its config's own ``trainer.max_steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, str] = {  # variant -> experiment config (configs/experiment/<name>.yaml)
    "main": "shapes",
    "no_warmup": "shapes_no_warmup",
    "sds": "shapes_sds",
    "text": "shapes_text",
    "no_ema": "shapes_no_ema",
    "unseen": "shapes_unseen",
    "no_identity": "shapes_no_identity",
    "long": "shapes_long",
    "long_palette": "shapes_long_palette",
    "long_sharp": "shapes_long_sharp",
}
# the README's table; long, long_palette and long_sharp (2,000 / 3,000 / 3,500 steps) on request
DEFAULT_VARIANTS = ("main", "no_warmup", "sds", "text", "no_ema", "unseen", "no_identity")
# never trained by the "unseen" variant (tasks=shapes_pairs), each from a trained source and a trained target color
UNSEEN_PAIRS = ("red_to_yellow", "green_to_blue", "blue_to_green", "yellow_to_red")
FAMILY = {"color": "color", "shape": "shape", "background": "background"}


def _trained_with_ema(train_dir: Path) -> bool:
    """Whether the run kept EMA weights, from the config it saved (the export uses them when it did)."""
    cfg = OmegaConf.load(train_dir / "config_resolved.yaml")
    return bool(OmegaConf.select(cfg, "optim.ema.enabled", default=False))


def train_and_export(name: str, experiment: str, args, overrides: tuple[str, ...] = ()) -> Path:
    """Train ``experiment=<experiment>`` with ``overrides`` (then ``args.overrides``) into ``args.out/name`` and
    export it; an existing export is reused unless ``args.retrain``."""
    run = args.out / name
    tr = run / "translator"
    if (tr / "translator.json").is_file() and not args.retrain:
        return tr
    if (run / "train").exists():  # a fresh run: no stale checkpoints or metrics from an earlier one beside it
        shutil.rmtree(run / "train")
    steps = []
    if args.steps is not None:
        steps = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                 f"callbacks.model_checkpoint.every_n_train_steps={args.steps}"]
        given = {o.split("=", 1)[0] for o in (*overrides, *args.overrides)}
        steps = [s for s in steps if s.split("=", 1)[0] not in given]  # an explicit override of the same key wins
    cmd = [sys.executable, "-m", "ddstrans.cli.train", f"experiment={experiment}", f"hydra.run.dir={run / 'train'}",
           "export_after_fit=false", "trainer.max_time=null", *steps,
           "trainer.enable_progress_bar=false", "~callbacks.progress_bar", *overrides, *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    t0 = time.time()
    with open(run.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    export(run / "train/checkpoints/last.ckpt", tr, args)
    done = OmegaConf.load(run / "train" / "config_resolved.yaml").trainer.max_steps
    print(f"[{name}] trained {done} steps in {time.time() - t0:.0f} s", flush=True)
    return tr


def export(ckpt: Path, dest: Path, args) -> Path:
    """Export a checkpoint of a run trained by :func:`train_and_export` into ``dest`` (its EMA weights when it kept
    them); output goes to the run's log."""
    train_dir = ckpt.parents[1]
    no_ema = ["--no-ema"] if not _trained_with_ema(train_dir) else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(train_dir.parent.with_suffix(".log"), "a") as log:
        subprocess.run([sys.executable, "-m", "ddstrans.cli.main", "export", str(ckpt), str(dest), "--overwrite",
                        *no_ema], check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return dest


def add_training_args(p: argparse.ArgumentParser, unit: str, out: Path) -> None:
    """The options of :func:`train_and_export` (``unit``: what one training run is called in the help)."""
    p.add_argument("--override", dest="overrides", action="append", default=[],
                   help=f"extra Hydra override for every {unit}'s training run (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--jobs", type=int, default=2, help=f"{unit}s trained in parallel")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--retrain", action="store_true", help=f"train again even if a {unit}'s translator exists")


def family_rows(rows: list[dict], label: str) -> list[dict]:
    """Average rows over the tasks of each family (color / shape / background)."""
    out = []
    for fam in ("color", "shape", "background"):
        part = [r for r in rows if r["attribute"] == fam]
        if part:
            agg = {k: mean(r[k] for r in part) for k in ("target_acc", "mask_iou", "keep_psnr", "diversity", "ms_per_image")}
            out.append({"variant": label, "family": fam, "tasks": ",".join(r["task"] for r in part), **agg})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | family | tasks | target acc | mask IoU | kept PSNR (dB) | diversity | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['family']} | {r['tasks']} | {r['target_acc']:.3f} | {r['mask_iou']:.3f} | "
                     f"{r['keep_psnr']:.2f} | {r['diversity']:.3f} | {r['ms_per_image']:.1f} |")
    return "\n".join(lines)


def targets_table(rows: list[dict], network: str = "network: main") -> str:
    """The quality targets, per family: the network against per-image DDS editing of the same run.

    A translator is as faithful as per-image editing when its accuracy is within 5 points of DDS's, its kept PSNR at
    least DDS's minus 1 dB and, for the shape change, its mask IoU with the target at least DDS's. Each cell gives
    both figures and whether the target holds, so a reader sees by how much it is missed."""
    net = {r["family"]: r for r in rows if r["variant"] == network}
    dds = {r["family"]: r for r in rows if r["variant"].startswith("per-image DDS")}
    lines = [f"| family | target acc ({network} / DDS) | kept PSNR dB ({network} / DDS) | mask IoU ({network} / DDS) |",
             "|---|---|---|---|"]

    def cell(a: float, b: float, ok: bool, fmt: str) -> str:
        return f"{a:{fmt}} / {b:{fmt}} {'yes' if ok else 'NO'}"

    for fam in (f for f in ("color", "shape", "background") if f in net and f in dds):
        n, d = net[fam], dds[fam]
        iou = cell(n["mask_iou"], d["mask_iou"], n["mask_iou"] >= d["mask_iou"], ".3f") if fam == "shape" else \
            f"{n['mask_iou']:.3f} / {d['mask_iou']:.3f}"
        lines.append(f"| {fam} | {cell(n['target_acc'], d['target_acc'], n['target_acc'] >= d['target_acc'] - 0.05, '.3f')} | "
                     f"{cell(n['keep_psnr'], d['keep_psnr'], n['keep_psnr'] >= d['keep_psnr'] - 1.0, '.2f')} | {iou} |")
    return "\n".join(lines)


def main() -> None:
    from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every variant (default: each experiment config's own trainer.max_steps)")
    p.add_argument("--n", type=int, default=64, help="held-out inputs per task for the networks")
    p.add_argument("--edit-n", type=int, default=16, help="held-out inputs per task for per-image DDS/SDS editing")
    p.add_argument("--edit-steps", type=int, default=100)
    p.add_argument("--edit-lr", type=float, default=0.02,
                   help="SGD lr on 2000 x surrogate loss (the reference's 0.1 overshoots on the pixel-space shapes teacher)")
    p.add_argument("--edit-t-max", type=int, default=600, help="per-image editing samples t in [50, t_max)")
    p.add_argument("--edit-guidance", type=float, default=SHAPES_EDIT_GUIDANCE,
                   help="classifier-free guidance of per-image DDS/SDS editing (default: the teacher card's)")
    add_training_args(p, "variant", ROOT / "outputs" / "quality")
    p.add_argument("--skip-editing", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    from ddstrans.shapes.defaults import load_shapes_teacher, shapes_task, shapes_tasks
    from ddstrans.shapes.evaluation import evaluate
    from ddstrans.translator import Translator

    all_tasks = {t.name: t for t in shapes_tasks()}
    results: list[dict] = []
    raw: dict[str, list[dict]] = {}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # training runs are subprocesses
        # so the 2,000- and 3,000-step runs are not left alone at the end
        longest_first = sorted(names, key=lambda n: not n.startswith("long"))
        dirs = dict(zip(longest_first, pool.map(lambda n: train_and_export(n, VARIANTS[n], args), longest_first)))
    for name in names:
        tr = Translator.from_pretrained(dirs[name])
        if name == "unseen":
            seen = tr.tasks
            rows = evaluate([shapes_task(t) for t in seen], args.n, ["network"], translator=tr)
            results += family_rows(rows, f"unseen: trained pairs ({','.join(seen)})")
            rows_u = evaluate([shapes_task(t) for t in UNSEEN_PAIRS], args.n, ["network"], translator=tr)
            results += family_rows(rows_u, f"unseen: new pairs ({','.join(UNSEEN_PAIRS)})")
            rows += rows_u
        else:
            rows = evaluate([all_tasks[t] for t in tr.tasks], args.n, ["network"], translator=tr)
            results += family_rows(rows, f"network: {name}")
        raw[name] = rows
        print(table(results[-3:]), flush=True)
    if not args.skip_editing:
        teacher = load_shapes_teacher()
        edit = {"steps": args.edit_steps, "lr": args.edit_lr, "t_range": (50, args.edit_t_max),
                "guidance": args.edit_guidance}
        for method in ("dds", "sds"):
            rows = evaluate(list(all_tasks.values()), args.edit_n, [method], teacher=teacher, edit_config=edit,
                            progress=True)
            raw[f"edit_{method}"] = rows
            results += family_rows(rows, f"per-image {method.upper()} ({args.edit_steps} steps)")
    text = table(results)
    net = [r for r in results if r["variant"] == "network: main"]
    dds = [r for r in results if r["variant"].startswith("per-image DDS")]
    if net and dds:
        ratio = mean(r["ms_per_image"] for r in dds) / mean(r["ms_per_image"] for r in net)
        text += f"\n\nPer-image DDS editing takes {ratio:.0f}x the time per image of the network (same run, same machine)."
        text += "\n\nTargets (accuracy within 5 points of DDS, kept PSNR >= DDS - 1 dB, shape IoU >= DDS):\n\n"
        text += targets_table(results)
    (args.out / "quality.md").write_text(text + "\n")
    (args.out / "quality.json").write_text(json.dumps({"summary": results, "rows": raw, "args": vars(args)}, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
