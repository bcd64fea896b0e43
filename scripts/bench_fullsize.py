#!/usr/bin/env python
"""The real CLI path on a randomly initialised teacher with the exact Stable Diffusion 1.5 architecture.

Builds the teacher from ``configs/arch/sd15/*.json`` (``ddstrans.arch``; no download), then runs, each stage as its
own process: ``ddstrans make-shards from-teacher`` (2 images, 2 sampling steps) -> ``ddstrans-train`` (2 steps at
256 px, per generator kind) -> ``ddstrans export`` -> ``ddstrans translate``. Prints wall time and peak RSS of each
stage (``os.wait4``: the stage process's own maximum resident set), and the parameter / byte counts of the training
checkpoint and the translator.

    scripts/bench_fullsize.py --generators lora             # full size (one fp32 SD-1.5 UNet: ~5 GB RSS)
    scripts/bench_fullsize.py --generators full             # two UNets + grads + AdamW + EMA: ~25 GB RSS
    scripts/bench_fullsize.py --generators full --train-override optim.ema.enabled=false   # no EMA copy: ~21 GB
    scripts/bench_fullsize.py --width-divisor 10 --resolution 64   # the narrow variant (seconds)
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

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = {"lora": "generator=lora_from_teacher", "full": "generator=from_teacher"}


def run_stage(name: str, cmd: list[str], env: dict, log: Path) -> dict:
    """Run one stage; its wall time and peak RSS (GiB, the process's own maximum). Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise SystemExit(f"stage {name} failed (exit {code}):\n" + "\n".join(tail))
    return {"stage": name, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def tensor_counts(ckpt_path: Path) -> dict:
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    return {"checkpoint_params": sum(v.numel() for v in sd.values()),
            "checkpoint_bytes": ckpt_path.stat().st_size}


def translator_counts(out: Path) -> dict:
    from safetensors import safe_open

    n = 0
    with safe_open(out / "generator" / "diffusion_pytorch_model.safetensors", "pt") as f:
        for k in f.keys():
            n += f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel") else \
                _prod(f.get_slice(k).get_shape())
    return {"translator_generator_params": n,
            "translator_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("outputs/bench_fullsize"))
    ap.add_argument("--width-divisor", type=int, default=1, help="divide every channel width (1: exact SD 1.5)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="training steps")
    ap.add_argument("--generators", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--reuse-shards", action="store_true",
                    help="keep the shards of an earlier run in --workdir (skips the make-shards stage when present)")
    ap.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override of the training stage (repeatable), e.g. optim.ema.enabled=false")
    args = ap.parse_args(argv)
    kinds = [g.strip() for g in args.generators.split(",") if g.strip()]
    bad = [g for g in kinds if g not in GENERATORS]
    if bad:
        ap.error(f"--generators: unknown {bad}; choose from {', '.join(GENERATORS)}")

    from ddstrans.arch import make_random_sd15

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "DDSTRANS_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    bin_dir = Path(sys.executable).parent
    teacher = work / f"teacher-w{args.width_divisor}"
    rows = []
    if not (teacher / "unet").is_dir():
        t0 = time.perf_counter()
        make_random_sd15(teacher.with_suffix(".partial"), width_divisor=args.width_divisor)
        os.replace(teacher.with_suffix(".partial"), teacher)
        rows.append({"stage": "build teacher", "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": None})
    shards = work / f"shards-w{args.width_divisor}-{args.resolution}"
    reuse = args.reuse_shards and (shards / "manifest.json").is_file()
    if not reuse:
        shutil.rmtree(shards, ignore_errors=True)
    rows.append({"stage": "make-shards from-teacher (reused)", "wall_s": None, "peak_rss_gib": None} if reuse else
                run_stage("make-shards from-teacher", [
        str(bin_dir / "ddstrans"), "make-shards", "from-teacher", str(shards), "--teacher", str(teacher),
        "--prompt", "a photo of a cat", "--count", "2", "--steps", "2", "--batch-size", "2",
        "--resolution", str(args.resolution), "--device", "cpu", "--no-progress"], env, work / "make_shards.log"))
    image = next(iter(sorted(work.glob("input.png"))), None)
    if image is None:
        from PIL import Image

        Image.new("RGB", (args.resolution, args.resolution), (120, 90, 60)).save(work / "input.png")
        image = work / "input.png"
    counts = {}
    for kind in kinds:
        run = work / f"run-{kind}-w{args.width_divisor}"
        shutil.rmtree(run, ignore_errors=True)
        rows.append(run_stage(f"train ({kind})", [
            str(bin_dir / "ddstrans-train"), "teacher=local", f"teacher.path_or_hub_id={teacher}", "tasks=smoke",
            GENERATORS[kind], "data=shards", f"data.urls={shards}", f"data.resolution={args.resolution}",
            "data.batch_size=1", "data.num_workers=0", "data.val_samples=1", "data.persistent_workers=false",
            "trainer=cpu", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "logger=csv",
            "model.validation.num_images=0", f"hydra.run.dir={run}", *args.train_override], env, work / f"train_{kind}.log"))
        ckpt = run / "checkpoints" / "last.ckpt"
        out = work / f"translator-{kind}-w{args.width_divisor}"
        rows.append(run_stage(f"export ({kind})", [
            str(bin_dir / "ddstrans"), "export", str(ckpt), str(out), "--overwrite"], env, work / f"export_{kind}.log"))
        trans = work / f"translated-{kind}"
        shutil.rmtree(trans, ignore_errors=True)
        rows.append(run_stage(f"translate ({kind})", [
            str(bin_dir / "ddstrans"), "translate", str(out), str(image), "--task", "cat2dog", "-o", str(trans),
            "--device", "cpu", "--no-progress"], env, work / f"translate_{kind}.log"))
        counts[kind] = {**tensor_counts(ckpt), **translator_counts(out)}

    print(f"SD-1.5 architecture / width_divisor={args.width_divisor}, {args.resolution} px, {args.steps} train steps")
    print("| stage | wall s | peak RSS GiB |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s'] if r['wall_s'] is not None else '-'} | "
              f"{r['peak_rss_gib'] if r['peak_rss_gib'] is not None else '-'} |")
    print("| generator | checkpoint params | checkpoint MB | translator generator params | translator MB |")
    print("|---|---:|---:|---:|---:|")
    for kind, c in counts.items():
        print(f"| {kind} | {c['checkpoint_params']:,} | {c['checkpoint_bytes'] / 2**20:.1f} | "
              f"{c['translator_generator_params']:,} | {c['translator_bytes'] / 2**20:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"stages": rows, "counts": counts, "args": {
            "width_divisor": args.width_divisor, "resolution": args.resolution, "steps": args.steps}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
