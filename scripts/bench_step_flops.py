#!/usr/bin/env python
"""How fast can the main job's step be on this CPU? FLOPs of its two network calls, and the rate each variant reaches.

The main job's step (``experiment=shapes``, batch 16) is two network calls plus small bookkeeping
(``scripts/profile_main_job_step.py``): the teacher's batched four-way CFG call (64 images, no gradient) and the
generator's forward and backward (16 images). This script counts their floating-point operations exactly
(``torch.utils.flop_counter``) and times each call eager, in channels-last memory format and under
``torch.compile`` (the ``model.memory.channels_last`` / ``model.memory.compile_teacher`` switches), then prints the
floor those rates put under ``--steps`` steps: if the floor is above a time budget, no scheduling or framework
overhead removed from the step can meet the budget without changing the networks or training less.

    python scripts/bench_step_flops.py                     # all variants (torch.compile: about 2.5 min extra)
    python scripts/bench_step_flops.py --variants eager    # seconds
"""

from __future__ import annotations

import argparse
import time

import torch


def median_ms(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """(median ms of ``repeats`` calls, seconds spent in the ``warmup`` calls: compilation shows up there)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2], warm


def count_gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="eager,channels_last,compile", help="comma-separated subset")
    p.add_argument("--steps", type=int, default=1200, help="steps of the run the floor is printed for")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=shapes")
    a = p.parse_args()
    import hydra

    from ddstrans.cli.train import compose
    from ddstrans.shapes.defaults import load_shapes_teacher

    torch.manual_seed(0)
    cfg = compose(["experiment=shapes", *a.overrides])
    batch = int(cfg.data.batch_size)
    teacher = load_shapes_teacher()
    unet = teacher.model
    generator = hydra.utils.instantiate(cfg.generator)(teacher=teacher, num_tasks=5)
    size = int(unet.config.sample_size)
    x_t = torch.randn(4 * batch, unet.config.in_channels, size, size)
    t = torch.randint(50, 950, (4 * batch,))
    emb = torch.randn(4 * batch, *teacher.uncond_embedding.shape[-2:])
    x_g = torch.randn(batch, unet.config.in_channels, size, size)
    task_ids = torch.arange(batch) % 5

    def teacher_call(model, x):
        def call():
            with torch.inference_mode():
                model(x, t, encoder_hidden_states=emb)
        return call

    def generator_call(model, x):
        def call():
            model(x, task_ids).square().mean().backward()
        return call

    flops = {"teacher": count_gflop(teacher_call(unet, x_t)), "generator": count_gflop(generator_call(generator, x_g))}
    print(f"threads: {torch.get_num_threads()}; batch {batch}: teacher 4-way CFG call on {4 * batch} images, "
          f"generator forward + backward on {batch}\n")
    print("| variant | call | GFLOP | median ms | GFLOP/s | warm-up s |")
    print("|---|---|---:|---:|---:|---:|")
    best = {}
    for variant in a.variants.split(","):
        xt, xg, u, g = x_t, x_g, unet, generator
        if variant == "channels_last":
            u, g = unet.to(memory_format=torch.channels_last), generator.to(memory_format=torch.channels_last)
            xt, xg = x_t.contiguous(memory_format=torch.channels_last), x_g.contiguous(memory_format=torch.channels_last)
        elif variant == "compile":
            u, g = torch.compile(unet), torch.compile(generator)
        elif variant != "eager":
            raise SystemExit(f"error: unknown variant {variant!r} (eager, channels_last, compile)")
        for name, call in (("teacher", teacher_call(u, xt)), ("generator", generator_call(g, xg))):
            ms, warm = median_ms(call, a.repeats, warmup=3)
            best[name] = min(best.get(name, float("inf")), ms)
            print(f"| {variant} | {name} | {flops[name]:.1f} | {ms:.0f} | {flops[name] / ms * 1000:.0f} | {warm:.1f} |")
        unet.to(memory_format=torch.contiguous_format)
        generator.to(memory_format=torch.contiguous_format)
    floor = a.steps * sum(best.values()) / 1000
    print(f"\nfloor for {a.steps} steps at the best rate of each call (network calls only, no validation, data, "
          f"optimizer or evaluation): {floor / 60:.1f} min")


if __name__ == "__main__":
    main()
