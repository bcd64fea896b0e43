#!/usr/bin/env python
"""Prompt pairs never trained: does a text-conditioned translator edit what no training step asked for?

Each design (a set of Hydra overrides of ``experiment=shapes_zero_shot``: how the prompts condition the network) is
trained on the single-attribute edits of ``configs/tasks/shapes_zero_shot.yaml`` (design ``varied``: those of
``shapes_zero_shot_varied.yaml``, which adds the other shapes and background), exported, and scored on 64
held-out inputs (seeds of ``ddstrans.shapes.seeds.HELD_OUT``) per task in three groups:

- trained: the 8 trained color pairs, the square, the checkers;
- new pairs: the 4 color pairs held out of training (a source and a target seen, never together);
- compositions: two attributes at once (a trained color pair with the square, or with the checkers), where
  training changed one at a time. Accuracy needs both changes.

Each translator is scored twice on the new pairs and the compositions: the network given the pair itself (one
forward pass), and ``routed`` (rows "<design>, routed"): the pair reached through the translator's trained caption
rewrites, one pass per step (``Translator.route``: red→yellow as red→blue, blue→yellow; a composition one attribute
at a time). On trained tasks both are the same single pass.

Prints one markdown table (mean per group; per-task rows in ``OUT/zero_shot.json``) and writes ``OUT/zero_shot.md``.

    python scripts/bench_zero_shot.py                          # designs changed,target: about 65 min on 2 cores
    python scripts/bench_zero_shot.py --designs target --steps 400 --n 16
    python scripts/bench_zero_shot.py --designs changed --every 200   # also each checkpoint kept every 200 steps

With ``--every N`` the training run keeps a checkpoint every N steps and each is exported and scored too (rows
"<design>, step S"): how what generalises changes while training goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import mean

from bench_quality import ROOT, add_training_args, export, train_and_export
from omegaconf import OmegaConf

DESIGNS: dict[str, tuple[str, ...]] = {  # design -> overrides of experiment=shapes_zero_shot
    "changed": (),  # the config's: target tokens, then those weighted by how much they differ from the source's
    "target": ("generator.text_mode=target",),  # the target prompt alone; the source is in the image
    "target_tokens": ("generator.text_mode=target", "generator.text_pooling=false"),  # ... cross-attention only
    "concat": ("generator.text_mode=concat",),  # source and target tokens
    "delta": ("generator.text_mode=delta",),  # target tokens and their difference from the source's
    "varied": ("tasks=shapes_zero_shot_varied",),  # the config's design, trained also on to_circle/_triangle/_striped
}
TRAINED_PAIRS = ("red_to_blue", "yellow_to_blue", "red_to_green", "yellow_to_green",
                 "green_to_red", "blue_to_red", "green_to_yellow", "blue_to_yellow")
ROUTED_GROUPS = ("new pairs", "compositions")  # where a route differs from the pair itself
GROUPS: dict[str, tuple[str, ...]] = {
    "trained": (*TRAINED_PAIRS, "to_square", "to_checkered"),
    "new pairs": ("red_to_yellow", "green_to_blue", "blue_to_green", "yellow_to_red"),
    "compositions": ("red_to_blue+to_square", "green_to_yellow+to_square",
                     "red_to_blue+to_checkered", "blue_to_red+to_checkered"),
}


def group_row(design: str, group: str, rows: list[dict]) -> dict:
    def avg(key):
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]  # NaN: nothing kept (color and background)
        return mean(vals) if vals else float("nan")

    return {"design": design, "group": group, "worst": min(rows, key=lambda r: r["target_acc"])["task"],
            "min_acc": min(r["target_acc"] for r in rows),
            **{k: avg(k) for k in ("target_acc", "color_acc", "shape_acc", "background_acc", "mask_iou", "keep_psnr")}}


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The run's ``step_<step>.ckpt`` files, by step (``last.ckpt`` is not among them)."""
    found = [(int(m.group(1)), f) for f in ckpt_dir.glob("step_*.ckpt") if (m := re.fullmatch(r"step_(\d+)\.ckpt", f.name))]
    return sorted(found)


def _cell(value: float, digits: int = 3) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| design | group | mean acc | lowest acc (task) | color / shape / background acc (compositions) | "
             "mask IoU | kept PSNR (dB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        each = " / ".join(_cell(r[k]) for k in ("color_acc", "shape_acc", "background_acc"))
        lines.append(f"| {r['design']} | {r['group']} | {r['target_acc']:.3f} | {r['min_acc']:.3f} ({r['worst']}) | "
                     f"{each} | {r['mask_iou']:.3f} | {_cell(r['keep_psnr'], 2)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", default="changed,target", help=f"comma-separated, from {', '.join(DESIGNS)} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment config's)")
    p.add_argument("--n", type=int, default=64, help="held-out inputs per task")
    p.add_argument("--every", type=int, default=None,
                   help="keep a checkpoint every N training steps and score each one too (default: the last only)")
    add_training_args(p, "design", ROOT / "outputs" / "zero_shot")
    args = p.parse_args()
    names = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in names if d not in DESIGNS]
    if unknown:
        sys.exit(f"unknown design(s) {', '.join(unknown)}; choose from {', '.join(DESIGNS)}")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    from concurrent.futures import ThreadPoolExecutor

    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import evaluate
    from ddstrans.translator import Translator

    keep = () if args.every is None else (f"callbacks.model_checkpoint.every_n_train_steps={args.every}",
                                          "callbacks.model_checkpoint.save_top_k=-1")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # training runs are subprocesses
        dirs = dict(zip(names, pool.map(
            lambda d: train_and_export(d, "shapes_zero_shot", args, (*DESIGNS[d], *keep)), names)))
    translators = []  # (label, export directory)
    for design in names:
        if args.every is not None:
            train_dir = dirs[design].parent / "train"
            last_step = OmegaConf.load(train_dir / "config_resolved.yaml").trainer.max_steps
            for step, ckpt in step_checkpoints(train_dir / "checkpoints"):
                if step == last_step:  # the last checkpoint's row is the design's own
                    continue
                translators.append((f"{design}, step {step}", export(ckpt, dirs[design].parent / f"step_{step}", args)))
        translators.append((design, dirs[design]))
    summary, raw = [], {}
    for label, path in translators:
        tr = Translator.from_pretrained(path)
        routed = f"{label}, routed"
        raw[label], raw[routed], rows_of = {}, {}, {label: [], routed: []}  # the routed rows after the network's
        for group, tasks in GROUPS.items():
            methods = ["network", "routed"] if group in ROUTED_GROUPS else ["network"]
            rows = evaluate([shapes_task(t) for t in tasks], args.n, methods, translator=tr)  # one eval set per task
            for method, name in (("network", label), ("routed", routed)):
                if mine := [r for r in rows if r["method"] == method]:
                    raw[name][group] = mine
                    rows_of[name].append(group_row(name, group, mine))
        summary += rows_of[label] + rows_of[routed]
        print(table(rows_of[label] + rows_of[routed]), flush=True)
    text = table(summary)
    (args.out / "zero_shot.md").write_text(text + "\n")
    (args.out / "zero_shot.json").write_text(json.dumps({"summary": summary, "rows": raw, "args": vars(args)},
                                                        indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
