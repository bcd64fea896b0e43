#!/usr/bin/env python
"""Training-step benchmark: how close the Lightning step is to the teacher-bound limit.

Measures, for one configuration and batch, in **interleaved rounds** (a, then b, c, d in rotating order, all in
one process, so machine noise hits every variant alike) and reports medians:

  (a) the full training step through Lightning: the real ``DDSTranslationModule`` in a real ``lightning.Trainer``
      (CSV logger every 10 steps + LR monitor as in ``configs/``, gradient clipping 1.0, AdamW + constant-with-warmup
      schedule, EMA; no checkpointing, no validation, no progress bar). Timed per loop iteration from one
      ``on_train_batch_start`` to the next (data fetch, hooks, logging included) minus the time this script spends
      measuring b, c, d inside ``on_train_batch_end``; the start->end hook window is shown too.
  (b) the teacher's batched four-way forward alone (``dds_grad``: [uncond, cond] x [source, target]) for the batch.
  (c) the generator's forward + backward alone (same architecture, same batch).
  (d) a plain PyTorch loop doing the same step without Lightning: batch from the same kind of DataLoader ->
      encode -> task/prompt sampling -> generator -> dds_grad -> surrogate loss -> backward -> clip 1.0 -> AdamW ->
      LR schedule -> EMA (``diffusers`` EMAModel, as the module).

Columns: median ms, images/s, peak memory (CUDA: ``max_memory_allocated``; CPU: process peak RSS, reset per phase
through ``/proc/self/clear_refs``), and the ratios overhead = a / (b + c) (goal <= 1.10), a / d (goal <= 1.05).
The **last line** is always ``overhead=<a/(b+c):.2f> vs_plain=<a/d:.2f>``.

    python scripts/bench_train_step.py --quick                       # ~1 min on 2 CPU cores, shapes teacher
    python scripts/bench_train_step.py --arch shapes --batch 8 --steps 30
    python scripts/bench_train_step.py --memory-sweep 1,2,4          # peak memory vs batch, teacher share
    python scripts/bench_train_step.py --ablations                   # optimisation before/after table (CPU/GPU)
    python scripts/bench_train_step.py --arch sd15 --device cuda --dtype bf16 --batch 4   # on a GPU

Architectures: ``tiny`` (random tiny SD-style teacher with a VAE, 4x8x8 latents; tiny generator config),
``shapes`` (the shipped pixel-space teacher ``checkpoints/shapes-teacher``, 3x32x32; generator = teacher's UNet
architecture; falls back to ``tiny`` with a message if the directory is absent or unreadable),
``sd15`` (Stable-Diffusion-1.5-shaped random UNet: 320/640/1280/1280, cross-attention 768, 64x64 latents, SD VAE
layout, a 1-layer CLIP text encoder of width 768; generator = the same UNet layout with gradient checkpointing as in
``configs/generator/from_teacher.yaml``). By default batches are cached latents (as ``data=shards`` with latents);
``--data pixels`` adds the VAE encode to every step.
``sdxl``, ``sd3``, ``flux`` (Flux-dev): the released architectures with random weights, held as their diffusers
pipelines by the teacher adapters (SDXL: the 2.6B UNet with cross-attention 2048 and micro-conditioning; SD3.5-medium:
SD3Transformer2DModel 24 layers x 1536, patch 2, 16-channel latents; FLUX.1-dev: 19 double + 38 single blocks x 3072,
guidance embedding). Text encoders are one layer of the real widths (prompt embeddings are cached; their size does
not matter); the VAE has SD's layout. ``--layers full|reduced`` (default: full on CUDA, reduced on CPU, where the
full models do not fit a few GB): reduced keeps every width and cuts depth (SDXL transformer depth 1/2/10 -> 1/1/2;
SD3 4 layers and a position table for up to 1536 px instead of 3072; Flux 1 double + 2 single blocks). The generator is ``configs/generator/small.yaml`` (a UNet; for
SDXL ``--gen from_teacher`` takes the teacher's layout). ``--resolution`` (default 1024 CUDA, 256 CPU).

This file is the command line and the (a)-vs-(b, c, d) benchmark; the setups, the component measurements and the
ablations are the package ``scripts/train_step/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step.ablations import run_ablations
from train_step.measure import Components, _lightning_callback_cls
from train_step.setups import (
    GRAD_CLIP,
    LOG_EVERY,
    MB,
    Memory,
    build_setup,
    log,
    make_loader,
    make_module,
    make_sync,
    precision_of,
    quiet,
    tensor_bytes,
)


# ---------------------------------------------------------------------- the benchmark
def run_bench(args, device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    sync = make_sync(device)
    mem = Memory(device)
    setup = build_setup(args.arch, device, dtype, workdir, args.grad_ckpt, args.sd15_base, args.layers,
                        args.resolution, args.gen)
    module = make_module(setup, teacher_dtype=args.teacher_dtype, device=device)
    if args.compile:
        module.generator.unet.compile()
        setup.teacher.model.compile()
    gen_init = copy.deepcopy(module.generator)
    n_iter = args.warmup + args.steps + 1  # +1: the last iteration only closes the previous one's interval
    loader = make_loader(setup, args.batch, n_iter, args.data)
    comps_factory = lambda: Components(module, gen_init, setup, args.batch, n_iter, args.data, device, dtype, sync)  # noqa: E731
    timer = _lightning_callback_cls()(comps_factory, args.warmup, mem, sync)
    logger = CSVLogger(str(workdir / "logs"), name="bench")
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision_of(dtype),
        max_steps=n_iter, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=LOG_EVERY,
        gradient_clip_val=GRAD_CLIP, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=logger, callbacks=[timer, LearningRateMonitor(logging_interval="step")],
        default_root_dir=str(workdir))
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - t0

    a_iter = timer.iteration_times()[args.warmup:]
    a_win = timer.windows[args.warmup:]
    med = {"a": statistics.median(a_iter), "a_window": statistics.median(a_win)}
    for k in ("b", "c", "d"):
        med[k] = statistics.median(timer.times[k])
    teacher_mods = setup.teacher.modules()
    res = {
        "arch": setup.arch, "note": setup.note, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "teacher_dtype": str(setup.teacher.dtype).replace("torch.", ""), "batch": args.batch, "steps": len(a_iter),
        "warmup": args.warmup, "data": args.data, "threads": torch.get_num_threads(), "compile": bool(args.compile),
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {"a": min(a_iter) * 1e3, **{k: min(timer.times[k]) * 1e3 for k in ("b", "c", "d")}},
        "peak_delta_mb": {k: max(v) / MB for k, v in timer.peaks.items() if v},
        "peak_abs_mb": {k: max(v) / MB for k, v in timer.peaks_abs.items() if v},
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else (
            "process peak RSS (VmHWM, reset per phase)" if mem.can_reset else "process peak RSS (not resettable)"),
        "teacher_weights_mb": tensor_bytes(teacher_mods) / MB,
        "generator_params_m": sum(p.numel() for p in module.generator.parameters()) / 1e6,
        "teacher_unet_params_m": sum(p.numel() for p in setup.teacher.model.parameters()) / 1e6,
        "overhead": med["a"] / (med["b"] + med["c"]),
        "vs_plain": med["a"] / med["d"],
        "images_per_s": {k: args.batch / med[k] for k in ("a", "d")},
        "fit_wall_s": wall,
        "raw_ms": {"a": [x * 1e3 for x in a_iter], "a_window": [x * 1e3 for x in a_win],
                   **{k: [x * 1e3 for x in timer.times[k]] for k in ("b", "c", "d")}},
    }
    # per-round ratios too (robust to slow drifts of the machine)
    ai = a_iter
    res["overhead_per_round_median"] = statistics.median(
        ai[i] / (timer.times["b"][i] + timer.times["c"][i]) for i in range(min(len(ai), len(timer.times["b"]))))
    res["vs_plain_per_round_median"] = statistics.median(
        ai[i] / timer.times["d"][i] for i in range(min(len(ai), len(timer.times["d"]))))
    # teacher share: what the teacher call leaves behind (must be ~ its output only, no graph)
    comps = timer.comps
    m0 = mem.reset()
    out = comps.teacher_call()
    sync()
    res["teacher_call"] = {"peak_delta_mb": (mem.peak() - m0) / MB, "retained_mb": (mem.current() - m0) / MB,
                           "output_mb": out.numel() * out.element_size() / MB,
                           "has_graph": bool(out.requires_grad or out.grad_fn is not None)}
    return res


def print_table(res: dict) -> None:
    m, p, pa = res["median_ms"], res["peak_delta_mb"], res["peak_abs_mb"]
    print(f"\n## bench_train_step: arch={res['arch']} device={res['device']} dtype={res['dtype']} "
          f"(teacher {res['teacher_dtype']}) batch={res['batch']} data={res['data']} threads={res['threads']} "
          f"compile={res['compile']}")
    print(f"{res['note']}; teacher denoiser {res['teacher_unet_params_m']:.2f}M params, generator "
          f"{res['generator_params_m']:.2f}M params; {res['steps']} measured rounds after {res['warmup']} warm-up")
    print(f"memory: {res['memory_kind']}\n")
    print("| variant | median ms | min ms | images/s | peak above phase start (MB) | peak absolute (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"a": "(a) Lightning step (loop iteration)", "b": "(b) teacher 4-way forward (dds_grad)",
             "c": "(c) generator fwd+bwd", "d": "(d) plain PyTorch step"}
    for k in ("a", "b", "c", "d"):
        ips = f"{res['batch'] / m[k] * 1e3:.1f}"
        print(f"| {names[k]} | {m[k]:.1f} | {res['min_ms'][k]:.1f} | {ips} | {p.get(k, float('nan')):.1f} | "
              f"{pa.get(k, float('nan')):.0f} |")
    print(f"| (a) hook window start->end only | {m['a_window']:.1f} | | | | |")
    print(f"| b + c (teacher-bound limit) | {m['b'] + m['c']:.1f} | | {res['batch'] / (m['b'] + m['c']) * 1e3:.1f} | | |")
    tc = res["teacher_call"]
    print(f"\noverhead a/(b+c): paired (median over rounds of a_k/(b_k+c_k)) {res['overhead_per_round_median']:.3f}, "
          f"ratio of medians {res['overhead']:.3f} (goal <= 1.10)")
    print(f"a/d: paired {res['vs_plain_per_round_median']:.3f}, ratio of medians {res['vs_plain']:.3f} (goal <= 1.05)")
    print("(the last line reports the paired ratios: each round's a, b, c, d run back to back, so load from other "
          "processes that drifts between rounds cancels; the ratio of medians mixes different rounds)")
    print(f"teacher: weights {res['teacher_weights_mb']:.1f} MB; one 4-way call: transient peak {tc['peak_delta_mb']:.1f} MB, "
          f"retained after the call {tc['retained_mb']:.1f} MB{' (RSS: glibc keeps freed heap unless MALLOC_MMAP_THRESHOLD_ is set, as --memory-sweep does)' if res['device'] == 'cpu' else ''} (its output is {tc['output_mb']:.2f} MB), "
          f"autograd graph: {'YES' if tc['has_graph'] else 'none'}")


# ---------------------------------------------------------------------- memory sweep
def memory_sweep(args, batches: list[int]) -> list[dict]:
    rows = []
    for b in batches:
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "res.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--arch", args.arch, "--batch", str(b),
                   "--steps", str(args.sweep_steps), "--warmup", "1", "--device", args.device, "--dtype", args.dtype,
                   "--data", args.data, "--grad-ckpt", args.grad_ckpt, "--sd15-base", str(args.sd15_base),
                   "--json", str(out)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ)
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # big tensors mmapped: RSS follows live memory
            log(f"[bench] memory sweep: batch {b} (fresh process)")
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            rows.append(json.loads(out.read_text()))
    print(f"\n## peak memory vs batch size (a: Lightning step), arch={args.arch}, device={args.device}, "
          f"{rows[0]['memory_kind']}; each batch size in a fresh process\n")
    print("| batch | (a) peak abs MB | (a) peak above step start MB | (c) gen fwd+bwd peak MB | teacher weights MB | "
          "teacher call transient MB | teacher retained after call MB | teacher output MB | teacher graph |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        tc = r["teacher_call"]
        print(f"| {r['batch']} | {r['peak_abs_mb']['a']:.0f} | {r['peak_delta_mb']['a']:.1f} | {r['peak_delta_mb']['c']:.1f} | "
              f"{r['teacher_weights_mb']:.1f} | {tc['peak_delta_mb']:.1f} | {tc['retained_mb']:.1f} | {tc['output_mb']:.2f} | "
              f"{'YES' if tc['has_graph'] else 'none'} |")
    print("\nteacher share held across the step = weights (constant) + retained after the call (~ its output); the "
          "transient peak of the call is freed before the generator's backward.")
    return rows


# ---------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="~1 minute on 2 CPU cores: shapes teacher, batch 4, 30 rounds")
    ap.add_argument("--arch", choices=("tiny", "shapes", "sd15", "sdxl", "sd3", "flux"), default="shapes")
    ap.add_argument("--layers", choices=("auto", "full", "reduced"), default="auto",
                    help="sdxl/sd3/flux depth (auto: full on CUDA, reduced on CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="sdxl/sd3/flux image size (default 1024 CUDA, 256 CPU)")
    ap.add_argument("--gen", choices=("small", "from_teacher"), default="small",
                    help="sdxl/sd3/flux generator: configs/generator/small.yaml or the teacher UNet's layout (sdxl)")
    ap.add_argument("--batch", type=int, default=None, help="per-step batch (default: 4 CPU, 4 sd15)")
    ap.add_argument("--steps", type=int, default=None, help="measured rounds (default 30; --quick 30)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds not measured (default 5; --quick 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default=None,
                    help="trainer precision: float32 = 32-true, bf16 = bf16-mixed with a bf16 teacher (default: bf16 on "
                         "CUDA, float32 on CPU)")
    ap.add_argument("--teacher-dtype", default="auto", help="module teacher_dtype (auto: as configs)")
    ap.add_argument("--data", choices=("latents", "pixels"), default="latents",
                    help="cached latents (default) or pixels through the teacher VAE every step")
    ap.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="auto",
                    help="generator gradient checkpointing (auto: on for sd15 as configs/generator/from_teacher.yaml)")
    ap.add_argument("--sd15-base", type=int, default=320, help="sd15 base width (320 = SD 1.5; smaller only for tests)")
    ap.add_argument("--compile", action="store_true", help="torch.compile teacher and generator UNets (nn.Module.compile)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: shared machine)")
    ap.add_argument("--memory-sweep", default=None, help="comma-separated batch sizes, e.g. 1,2,4")
    ap.add_argument("--sweep-steps", type=int, default=3)
    ap.add_argument("--ablations", action="store_true", help="run the optimisation before/after measurements")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--workdir", default=None, help="where the tiny teacher/logs go (default: a temp dir)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if dev.type == "cuda" else "float32")
    if args.batch is None:
        args.batch = 1 if args.arch in ("sdxl", "sd3", "flux") else 4
    if args.steps is None:
        args.steps = 30 if args.quick else 30
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory(prefix="ddstrans-bench-") as td:
        workdir = Path(args.workdir) if args.workdir else Path(td)
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DDSTRANS_CACHE", str(workdir / "cache"))
        if args.ablations:
            run_ablations(args, device, dtype, workdir)
            if args.steps <= 0:
                return 0
        if args.memory_sweep:
            memory_sweep(args, [int(x) for x in args.memory_sweep.split(",") if x.strip()])
        res = run_bench(args, device, dtype, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print_table(res)
    print(f"overhead={res['overhead_per_round_median']:.2f} vs_plain={res['vs_plain_per_round_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
