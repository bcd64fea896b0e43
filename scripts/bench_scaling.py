#!/usr/bin/env python
"""Multi-process scaling of ``ddstrans-train``: images/s at 1 and N processes with the same per-process batch.

Each configuration is a real ``ddstrans-train`` run (DDP over gloo on CPU, NCCL on GPUs) reading webdataset shards
with ``--workers`` loader workers per rank. A callback (:class:`StepTimer`) stamps every optimizer step on rank 0;
the median step time after ``--warmup`` steps gives images/s = processes x per-process batch / step time, and
efficiency = images/s(N) / (N x images/s(1)). The loader alone is timed too (images/s one rank's DataLoader
delivers), so "is data loading the bottleneck?" has a number: it is not while the loader's rate exceeds the
training rate per rank.

    scripts/bench_scaling.py --procs 1,2 --workers 1 --batch 8 --steps 30          # CPU (gloo)
    scripts/bench_scaling.py --procs 1,4 --accelerator gpu --teacher sd15-dir --resolution 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Rank 0 writes the wall-clock time of every optimizer step to ``path`` (JSON) at the end of training."""

    def __init__(self, path: str):
        self.path, self.stamps = path, []

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.is_global_zero:
            self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, *args, **kwargs):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.stamps))


def make_shards(work: Path, n_images: int, size: int, env: dict) -> Path:
    import numpy as np
    from PIL import Image

    src, out = work / "images", work / "shards"
    if (out / "manifest.json").is_file():
        return out
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(src / f"{i:04d}.png")
    subprocess.run([str(Path(sys.executable).parent / "ddstrans"), "make-shards", "from-folder", str(src), str(out),
                    "--maxcount", str(max(1, n_images // 8)), "--no-progress"], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return out


def loader_rate(shards: Path, batch: int, workers: int, resolution: int, batches: int = 20) -> float:
    """Images/s one rank's training DataLoader delivers on its own."""
    from ddstrans.data.shards import ShardDataModule

    dm = ShardDataModule(urls=str(shards), batch_size=batch, num_workers=workers, resolution=resolution,
                         val_samples=0, use_latents=False, persistent_workers=False, pin_memory=False,
                         shuffle_buffer=64)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--workers", default="1", help="loader workers per rank (comma-separated to compare)")
    ap.add_argument("--batch", type=int, default=8, help="per-process batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--teacher", default=None, help="teacher directory (default: the tiny random teacher)")
    ap.add_argument("--generator", default="tiny")
    ap.add_argument("--workdir", type=Path, default=Path("outputs/bench_scaling"))
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    shards = make_shards(work, 256, max(args.resolution, 32), env)
    teacher = (["teacher=local", f"teacher.path_or_hub_id={args.teacher}"] if args.teacher else ["teacher=tiny_random"])
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rate = loader_rate(shards, args.batch, workers, args.resolution)
        for n in [int(p) for p in args.procs.split(",")]:
            stamps = work / f"stamps-p{n}-w{workers}.json"
            stamps.unlink(missing_ok=True)
            trainer = (["trainer=ddp", f"trainer.devices={n}", "trainer.num_nodes=1"] if n > 1 else ["trainer=cpu"])
            cmd = [str(Path(sys.executable).parent / "ddstrans-train"), *teacher, "tasks=smoke",
                   f"generator={args.generator}", "data=shards", f"data.urls={shards}",
                   f"data.resolution={args.resolution}", f"data.batch_size={args.batch}",
                   f"data.num_workers={workers}", "data.val_samples=0", *trainer,
                   f"trainer.accelerator={args.accelerator}", "trainer.precision=32-true" if args.accelerator == "cpu"
                   else "trainer.precision=bf16-mixed", f"trainer.max_steps={args.steps}",
                   "trainer.val_check_interval=100000", "trainer.limit_val_batches=0",
                   "trainer.enable_progress_bar=false", "logger=none", "callbacks=none",
                   "+callbacks.step_timer._target_=bench_scaling.StepTimer", f"+callbacks.step_timer.path={stamps}",
                   f"hydra.run.dir={work / f'run-p{n}-w{workers}'}"]
            log = work / f"train-p{n}-w{workers}.log"
            with open(log, "w") as f:
                rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0 or not stamps.is_file():
                print(f"run with {n} process(es) failed (exit {rc}); see {log}", file=sys.stderr)
                return 1
            t = json.loads(stamps.read_text())[args.warmup:]
            step = statistics.median(b - a for a, b in zip(t, t[1:]))
            rows.append({"procs": n, "workers": workers, "step_s": step, "images_s": n * args.batch / step,
                         "loader_images_s": rate})
    print(f"per-process batch {args.batch}, {args.resolution} px, generator={args.generator}, "
          f"accelerator={args.accelerator}, {args.steps} steps (median after {args.warmup})")
    print("| processes | loader workers / rank | median step s | images/s | efficiency | loader alone, images/s per rank |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = {r["workers"]: r["images_s"] for r in rows if r["procs"] == 1}
    for r in rows:
        eff = r["images_s"] / (r["procs"] * base[r["workers"]]) if r["workers"] in base else float("nan")
        print(f"| {r['procs']} | {r['workers']} | {r['step_s']:.3f} | {r['images_s']:.1f} | {eff:.2f} | "
              f"{r['loader_images_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
