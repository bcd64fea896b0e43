#!/usr/bin/env python
"""What a keep-adapters LoRA translator saves at full size, and what checking its base costs.

Builds a randomly initialised UNet of the exact SD-1.5 (or SDXL) architecture from ``configs/arch`` (no download),
injects the LoRA generator (rank, default target modules; task-id conditioning with 77 tokens per task), writes
``generator/adapters.safetensors`` as ``ddstrans export --keep-adapters`` does, and times the base hash that every
load computes (``ddstrans.lora_export.unet_sha256``). Prints one markdown table.

    python scripts/bench_keep_adapters.py                  # SD 1.5, rank 8: ~4 GB RAM, about a minute on CPU
    python scripts/bench_keep_adapters.py --arch sdxl      # ~11 GB RAM
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--width-divisor", type=int, default=1, help="narrow every width (a quick check of the script)")
    args = p.parse_args(argv)

    from diffusers import UNet2DConditionModel

    from ddstrans.arch import arch_config, narrowed
    from ddstrans.lora import LoRATeacherGenerator
    from ddstrans.lora_export import unet_sha256, write_adapters

    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = {k: v for k, v in narrowed(arch_config(args.arch, "unet"), args.width_divisor, "unet").items()
           if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg).eval()
    build_s = time.perf_counter() - t0
    base_params = sum(p.numel() for p in unet.parameters())
    t0 = time.perf_counter()
    digest = unet_sha256(unet)
    hash_s = time.perf_counter() - t0
    gen = LoRATeacherGenerator(unet, num_tasks=args.tasks, rank=args.rank, num_task_tokens=77)
    trained = sum(p.numel() for _, p in gen.trainable_named_parameters())
    with tempfile.TemporaryDirectory() as d:
        write_adapters(gen, Path(d))
        adapters_bytes = (Path(d) / "generator" / "adapters.safetensors").stat().st_size
    mib = 1 << 20
    print(f"| arch | rank | base UNet parameters | base float32 MiB | trained parameters | adapters.safetensors MiB "
          f"| base hash s | build s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {args.arch}{'' if args.width_divisor == 1 else f' /{args.width_divisor}'} | {args.rank} | "
          f"{base_params:,} | {base_params * 4 / mib:,.1f} | {trained:,} | {adapters_bytes / mib:,.1f} | "
          f"{hash_s:.1f} | {build_s:.1f} |")
    print(f"unet_sha256={digest[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
