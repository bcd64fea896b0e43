#!/usr/bin/env python
"""Peak memory of real DDS training steps on a random SD-1.5-architecture teacher, next to the memory model's
prediction (``ddstrans.memory``). On CUDA the figure is ``torch.cuda.max_memory_allocated`` over three steps (what
the model predicts); on CPU it is the process's peak RSS (weights in fp32, for the calibration of the model).

Each setting runs in a fresh process, so no allocation of one setting is counted in another's peak.

    scripts/measure_memory.py --device cuda                      # the GPU check's settings (SD 1.5, 512 px)
    scripts/measure_memory.py --device cpu --width-divisor 10 --resolution 64 --settings lora-b1   # code path only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (generator, batch, gradient checkpointing, attention, cached latents)
SETTINGS = {
    "lora-b1": ("lora", 1, True, "sdpa", False),
    "lora-b4": ("lora", 4, True, "sdpa", False),
    "lora-b4-nockpt": ("lora", 4, False, "sdpa", False),
    "lora-b4-eager": ("lora", 4, False, "eager", False),
    "full-b1": ("full", 1, True, "sdpa", True),
}


def one(args) -> dict:
    import functools

    import torch

    from ddstrans.generator import build_generator
    from ddstrans.lora import build_lora_generator
    from ddstrans.module import DDSTranslationModule
    from ddstrans.savers import apply_teacher_savers
    from ddstrans.scores import dds_grad, surrogate_loss
    from ddstrans.teacher import Teacher

    gen_kind, batch, ckpt, attention, cached = SETTINGS[args.one]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    tdtype = torch.bfloat16 if cuda else torch.float32
    teacher = Teacher.from_pretrained(args.teacher, torch_dtype=tdtype, cache_dir=Path(args.teacher) / "cache")
    apply_teacher_savers(teacher, {"attention": attention})
    tasks = [{"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]
    factory = (functools.partial(build_lora_generator, gradient_checkpointing=ckpt) if gen_kind == "lora" else
               functools.partial(build_generator, init_from_teacher=True, gradient_checkpointing=ckpt,
                                 num_task_tokens=4))
    teacher.to(dev, tdtype)
    m = DDSTranslationModule(teacher, tasks, factory, teacher_dtype=tdtype, validation={"num_images": 0})
    m.to(dev)
    m._place_teacher()
    params = [p for _, p in m._ema_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    res = args.resolution
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(step)
        if cached:
            z = torch.randn(batch, 4, res // 8, res // 8, generator=g).to(dev)
        else:
            z = teacher.encode_images((torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(dev)).float()
        ids = torch.zeros(batch, dtype=torch.long, device=dev)
        src, tgt = m.task_table.first(ids)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            z_tgt = m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
        grad = dds_grad(teacher, z, z_tgt.detach().float(), src.to(tdtype), tgt.to(tdtype), guidance_scale=7.5,
                        t_range=(50, 950), generator=g)
        surrogate_loss(z_tgt.float(), grad).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.ema.step(params)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"setting": args.one, "peak_gib": peak / 2**30, "step_s": min(times), "device": str(dev),
            "trainable": sum(p.numel() for p in params)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--width-divisor", type=int, default=1)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--teacher", default=None, help="existing teacher dir (default: build one in --workdir)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ddstrans-measure-memory"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    from ddstrans.arch import make_random_sd15
    from ddstrans.memory import Setting, predict

    teacher = Path(args.teacher) if args.teacher else args.workdir / f"sd15-w{args.width_divisor}"
    if not (teacher / "unet").is_dir():
        make_random_sd15(teacher, width_divisor=args.width_divisor)
    print(f"SD-1.5 architecture (width / {args.width_divisor}), {args.resolution} px, device {args.device}; "
          "measured = cuda max_memory_allocated over 3 steps (CPU: peak RSS, fp32)")
    print("| setting | generator | batch | grad. ckpt | attention | cached latents | measured GiB | predicted GiB | step s |")
    print("|---|---|---:|---|---|---|---:|---:|---:|")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in args.settings.split(","):
        gen, batch, ckpt, attention, cached = SETTINGS[name]
        r = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device, "--resolution",
                            str(args.resolution), "--teacher", str(teacher)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | {gen} | {batch} | {ckpt} | {attention} | {cached} | failed: {tail[:80]} | | |")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        pred = "-"
        if args.width_divisor == 1:
            fp32 = not args.device.startswith("cuda")
            pred = f"{predict(Setting(resolution=args.resolution, batch=batch, generator=gen, gradient_checkpointing=ckpt, attention=attention, cached_latents=cached, precision='fp32' if fp32 else 'bf16', teacher_dtype='fp32' if fp32 else 'bf16'))['peak_gib']:.2f}"
        print(f"| {name} | {gen} | {batch} | {ckpt} | {attention} | {cached} | {m['peak_gib']:.2f} | {pred} | "
              f"{m['step_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
