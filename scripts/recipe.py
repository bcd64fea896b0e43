"""The DDS paper's recipe on the shapes world: train a translator only on images the teacher generates, score it
on rendered scenes (the synthetic-to-real gap, measured).

1. generate ``--n`` images per shapes-world caption with the teacher (``ddstrans make-shards from-teacher``, the
   teacher's own sampling settings; the shapes reader's caption check drops samples that miss their caption);
2. train ``experiment=shapes`` on those shards only (``data=shards``: no rendered scene enters training), export;
3. ``ddstrans eval`` the export on held-out rendered scenes, beside ``--baseline`` translators (e.g. the main job's,
   trained on renders; ``--train-baseline`` trains one here with the same steps) in one markdown table.

    python scripts/recipe.py --out outputs/recipe                      # the default run
    python scripts/recipe.py --out outputs/recipe-small --n 4 --steps 200 --eval-n 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_N = 20  # images per caption: 24 captions x 20 = 480 teacher samples
DEFAULT_STEPS = 1200  # experiment=shapes's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/recipe"), help="working directory (shards, run, export, table)")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the shipped shapes teacher)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"teacher images per caption (default {DEFAULT_N})")
    p.add_argument("--captions", type=int, default=None, help="use only the first K world captions (tests)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--eval-n", type=int, default=64, help="held-out rendered inputs per task (default 64)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR",
                   help="an exported translator scored beside the recipe's (repeatable)")
    p.add_argument("--train-baseline", action="store_true",
                   help="also train experiment=shapes on rendered scenes with the same steps, as the baseline")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for both trainings")
    p.add_argument("--batch-size", type=int, default=16, help="teacher sampling batch (default 16)")
    return p.parse_args(argv)


def cli(argv: list[str]) -> None:
    from ddstrans.cli.main import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"`ddstrans {' '.join(argv[:2])}` failed with exit status {rc}")


def generate(args, captions: list[str]) -> tuple[dict, float]:
    t0 = time.time()
    prompts = [w for c in captions for w in ("--prompt", c)]
    teacher = ["--teacher", args.teacher] if args.teacher else []
    from ddstrans.shapes.defaults import shapes_teacher_path

    teacher = teacher or ["--teacher", str(shapes_teacher_path())]
    cli(["make-shards", "from-teacher", str(args.out / "shards"), *teacher, *prompts,
         "--count", str(args.n * len(captions)), "--batch-size", str(args.batch_size), "--no-progress"])
    return json.loads((args.out / "shards" / "manifest.json").read_text()), time.time() - t0


def train_and_export(args, name: str, data: list[str]) -> tuple[Path, float]:
    """Train ``experiment=shapes`` with ``data`` overrides into OUT/<name>; returns the export and the time."""
    from ddstrans.cli.train import compose, train

    export_dir = args.out / f"{name}-export"
    teacher = [f"teacher.path_or_hub_id={args.teacher}"] if args.teacher else []
    overrides = ["experiment=shapes", *data, *teacher, f"trainer.max_steps={args.steps}", "trainer.max_time=null",
                 f"trainer.val_check_interval={min(200, args.steps)}", f"callbacks.model_checkpoint.every_n_train_steps={min(200, args.steps)}",
                 "~callbacks.shapes_metrics", f"paths.checkpoint_dir={export_dir.resolve()}", f"task_name={name}",
                 *args.override]
    t0 = time.time()
    train(compose(overrides, args.out / f"{name}-run"))
    exports = sorted(p for p in export_dir.iterdir() if p.is_dir())
    if not exports:
        raise SystemExit(f"training {name} exported nothing into {export_dir}")
    return exports[-1], time.time() - t0


def evaluate(args, translator: Path, name: str) -> list[dict]:
    out = args.out / f"eval-{name}.json"
    cli(["eval", str(translator), "--methods", "network", "--n", str(args.eval_n), "--json", str(out)])
    return json.loads(out.read_text())


def table(results: dict[str, list[dict]], times: dict[str, str]) -> str:
    lines = ["| translator | task | target acc | mask IoU | kept PSNR (dB) | diversity |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['task']} | {r['target_acc']:.3f} | {r['mask_iou']:.3f} | "
                         f"{r['keep_psnr']:.2f} | {r['diversity']:.3f} |")
    lines += ["", "| step | time |", "|---|---|", *(f"| {k} | {v} |" for k, v in times.items())]
    return "\n".join(lines)


def minutes(sec: float) -> str:
    return f"{int(sec // 60)} min {int(sec % 60)} s"


def main(argv=None) -> str:
    args = parse_args(argv)
    from ddstrans.shapes.world import all_captions

    captions = all_captions()[: args.captions] if args.captions else all_captions()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest, t_gen = generate(args, captions)
    data = ["data=shards", f"data.urls={(args.out / 'shards').resolve()}", f"data.resolution={manifest['resolution']}",
            "data.num_workers=0",
            "data.persistent_workers=false", "data.batch_size=16", "data.val_samples=8",
            "data.shuffle_buffer=500", "data.pin_memory=false"]
    gate = manifest.get("caption_check")
    check = f"{gate['accepted']} accepted by the caption check" if gate else "no caption check"
    times = {f"generation ({args.n} x {len(captions)} captions = {args.n * len(captions)} samples, {check})": minutes(t_gen)}
    export, t_train = train_and_export(args, "recipe", data)
    times[f"training on teacher samples ({args.steps} steps)"] = minutes(t_train)
    results = {"recipe (teacher samples)": evaluate(args, export, "recipe")}
    baselines = dict(b.split("=", 1) for b in args.baseline)
    if args.train_baseline:
        base, t_base = train_and_export(args, "renders", [])
        times[f"training on renders ({args.steps} steps)"] = minutes(t_base)
        baselines["renders (same steps)"] = base
    for name, path in baselines.items():
        results[name] = evaluate(args, Path(path), name.split()[0])
    text = table(results, times)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
