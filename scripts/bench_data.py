#!/usr/bin/env python
"""Loader throughput vs training-step consumption.

Measures (1) samples/s of ``ShardDataModule`` at the training resolution with N DataLoader workers and
(2) samples/s one training step consumes (VAE encode of the batch + generator forward/backward + the
DDS teacher call: one batched UNet call over [uncond, cond] x [source, target]) — and prints their ratio.
A ratio below ~1.5 means the GPU will wait on data: add workers, use ``--latents`` shards or smaller JPEGs.

    python scripts/bench_data.py                                   # synthetic shards, tiny random teacher
    python scripts/bench_data.py --urls '/data/cats/shards-{000000..000099}.tar' --teacher /models/sd15 \
        --resolution 512 --batch-size 4 --workers 0 4 8 --device cuda

Without ``--urls`` it writes synthetic JPEG shards (``--make`` images of ``--src-size``) into a temp dir.
Without ``--teacher`` it uses a tiny random SD-style teacher (VAE factor 2): only the loader figures are
then meaningful for real runs; the step rate is of the tiny model.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synth_shards(out: Path, n: int, size: tuple[int, int], per_shard: int = 64, latents=None, resolution=None) -> str:
    """Smooth random 'photos' as JPEG (q=90), captions, optional latents; returns a brace pattern."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    manifest = {"shards": {}, "resolution": resolution, "latents": latents is not None}
    nshards = (n + per_shard - 1) // per_shard
    k = 0
    for s in range(nshards):
        name = f"shards-{s:06d}.tar"
        cnt = 0
        with wds.TarWriter(str(out / name)) as tw:
            while cnt < per_shard and k < n:
                small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                tw.write({"__key__": f"{k:08d}", "jpg": buf.getvalue(), "txt": "a photo of a cat"})
                k += 1
                cnt += 1
        manifest["shards"][name] = {"count": cnt}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out / f"shards-{{000000..{nshards - 1:06d}}}.tar")


def bench_loader(urls: str, resolution: int, batch_size: int, workers: int, batches: int, factor: int,
                 uint8: bool = True) -> float:
    from ddstrans.data.shards import ShardDataModule, pixels_to_float

    dm = ShardDataModule(
        urls=urls, batch_size=batch_size, num_workers=workers, resolution=resolution, shuffle_buffer=256,
        resampled=True, batches_per_epoch=batches + 1, val_samples=0, downsample_factor=factor,
        use_latents=False, persistent_workers=False, pin_memory=False, prefetch_factor=2,
    )
    dl = dm.train_dataloader()
    dm.train_stream.pixels_uint8 = uint8  # as under a Trainer: workers ship uint8, converted after transfer
    it = iter(dl)
    next(it)  # warm-up (worker start, first shards): the clock starts when the first batch arrives
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = pixels_to_float(next(it))  # (on the GPU in training; here on the CPU)
        n += b["pixels"].shape[0]
    dt = time.perf_counter() - t0
    del it
    return n / dt


def bench_step(teacher, resolution: int, batch_size: int, steps: int, device: str) -> float:
    from ddstrans.generator import build_generator
    from ddstrans.guidance import Guidance
    from ddstrans.scores import surrogate_loss

    gen = build_generator(teacher=teacher, num_tasks=2, copy_teacher_architecture=True).to(device)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-5)
    emb = teacher.encode_prompts(["a photo of a cat"] * batch_size)
    emb_t = teacher.encode_prompts(["a photo of a dog"] * batch_size)
    x = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    tids = torch.zeros(batch_size, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z_src = teacher.encode_images(x)
        z_tgt = gen(z_src, task_ids=tids)
        grad = Guidance().grad(teacher, z_src, z_tgt.detach(), emb, emb_t)
        loss = surrogate_loss(z_tgt, grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", help="shard pattern (default: synthetic JPEG shards in a temp dir)")
    p.add_argument("--make", type=int, default=256, help="synthetic images to write without --urls (default 256)")
    p.add_argument("--src-size", default="768x576", help="synthetic image size WxH (default 768x576)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch size (default 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--batches", type=int, default=40, help="timed loader batches per setting (default 20)")
    p.add_argument("--teacher", help="teacher dir / hub id for the step rate (default: tiny random teacher)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (default 5)")
    p.add_argument("--device", default="auto", help="device of the training step (auto, cpu, cuda)")
    p.add_argument("--dtype", default=None, help="teacher dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--float-workers", action="store_true",
                   help="workers ship float32 pixels (default: uint8, as under a Trainer)")
    p.add_argument("--no-step", action="store_true", help="only measure the loader")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")

    step_rate = None
    factor = 8
    if not args.no_step:
        from ddstrans.teacher import Teacher

        if args.teacher:
            path = args.teacher
        else:
            from ddstrans.testing import make_tiny_sd

            path = make_tiny_sd(Path(tmp.name) / "teacher", sample_size=args.resolution // 2)
        dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
        teacher = Teacher.from_pretrained(path, torch_dtype=getattr(torch, dtype), device=device,
                                          cache_dir=Path(tmp.name) / "cache")
        factor = teacher.downsample_factor
        step_rate = bench_step(teacher, args.resolution, args.batch_size, args.steps, device)

    urls = args.urls
    if not urls:
        w, h = (int(v) for v in args.src_size.lower().split("x"))
        urls = synth_shards(Path(tmp.name) / "shards", args.make, (w, h))

    rows = []
    for nw in args.workers:
        rate = bench_loader(urls, args.resolution, args.batch_size, nw, args.batches, factor, not args.float_workers)
        rows.append((nw, rate))

    src = args.urls or f"synthetic {args.make} x {args.src_size} JPEG"
    print(f"\nloader: {src} -> {args.resolution}px, batch {args.batch_size}; CPU cores: {os.cpu_count()}")
    if step_rate is not None:
        tname = args.teacher or "tiny random teacher"
        print(f"training step: {tname} on {device}: {step_rate:.2f} samples/s "
              f"({args.batch_size / step_rate * 1000:.0f} ms/step, batch {args.batch_size})")
    print(f"\n{'workers':>7} | {'loader samples/s':>16} | {'step samples/s':>14} | {'loader/step':>11}")
    print("-" * 58)
    for nw, rate in rows:
        ratio = f"{rate / step_rate:11.2f}" if step_rate else f"{'-':>11}"
        step = f"{step_rate:14.2f}" if step_rate else f"{'-':>14}"
        print(f"{nw:>7} | {rate:16.1f} | {step} | {ratio}")
    if step_rate:
        best = max(r for _, r in rows)
        verdict = "keeps up" if best >= 1.5 * step_rate else "is the bottleneck (add workers / use --latents shards)"
        print(f"\nbest loader/step ratio {best / step_rate:.2f}: the loader {verdict}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
