"""``bench_train_step.py --ablations``: each optimisation of the training step switched off in turn, timed in
interleaved rounds against the step with all of them, so the table shows what each one is worth on this device.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from ddstrans.guidance import Guidance
from train_step.setups import (
    GRAD_CLIP,
    LOG_EVERY,
    LR,
    MB,
    Memory,
    Setup,
    autocast_ctx,
    build_setup,
    make_loader,
    make_module,
    make_sync,
    precision_of,
)


# ---------------------------------------------------------------------- optimisation ablations
def interleaved(fns: dict, rounds: int, warmup: int, sync, mem: Memory) -> dict:
    """Median ms and peak memory (MB above the phase start) of each variant, measured in interleaved rounds."""
    times = {k: [] for k in fns}
    peaks = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            m0 = mem.reset()
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
                peaks[k].append(mem.peak() - m0)
    return {k: {"ms": statistics.median(times[k]) * 1e3, "min_ms": min(times[k]) * 1e3, "peak_mb": max(peaks[k]) / MB}
            for k in fns}


def _teacher_variant(teacher, unet):
    """A shallow copy of ``teacher`` using another UNet (for A/B of UNet settings)."""
    t = copy.copy(teacher)
    t.unet = unet
    return t


def lightning_step_times(module, loader, steps: int, device, dtype, workdir: Path, sync) -> list[float]:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class T(L.Callback):
        def __init__(self):
            self.starts = []

        def on_train_batch_start(self, *a):
            sync()
            self.starts.append(time.perf_counter())

    cb = T()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision_of(dtype),
        max_steps=steps + 1, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=LOG_EVERY,
        gradient_clip_val=GRAD_CLIP, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(str(workdir / "logs"), name="abl"), callbacks=[cb, LearningRateMonitor(logging_interval="step")],
        default_root_dir=str(workdir))
    trainer.fit(module, train_dataloaders=loader)
    return [b - a for a, b in zip(cb.starts, cb.starts[1:])]


def module_variants(setup: Setup, teacher_dtype: str, device: torch.device):
    """Subclasses of DDSTranslationModule that each remove one per-step cost (to size pending module.py changes)."""
    from ddstrans.module import DDSTranslationModule

    class NoLog(DDSTranslationModule):
        def log(self, *a, **k):  # the 6 self.log calls per step (+ grad_norm log)
            return None

    class NoGradNorm(DDSTranslationModule):
        def on_before_optimizer_step(self, optimizer):
            if self._skip_step:
                for p in self.generator.parameters():
                    p.grad = None
            self._stepped = not self._skip_step

    class EmaForeach(DDSTranslationModule):
        def _new_ema(self):
            ema = super()._new_ema()
            if ema is not None:
                ema.foreach = True
            return ema

    def factory(cls):
        def build():
            torch.manual_seed(0)
            m = make_module(setup, teacher_dtype, device=device)
            m.__class__ = cls
            m.ema = m._new_ema()
            return m
        return build

    return {name: factory(cls) for name, cls in (
        ("module as is", DDSTranslationModule), ("no self.log", NoLog),
        ("no grad-norm diagnostic", NoGradNorm), ("EMA foreach=True", EmaForeach))}


def run_ablations(args, device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    from ddstrans.scores import dds_grad, surrogate_loss

    sync, mem = make_sync(device), Memory(device)
    rounds, warm = (8, 2) if args.quick else (20, 3)
    setup = build_setup(args.arch, device, dtype, workdir, args.grad_ckpt, args.sd15_base)
    teacher = setup.teacher
    tdt = dtype if device.type == "cuda" else torch.float32
    teacher.to(device, tdt)
    module = make_module(setup, args.teacher_dtype, device=device)
    table = module.task_table.to(device)
    b = args.batch
    g = torch.Generator().manual_seed(0)
    shape = (b, *setup.latent_shape())
    z_src = torch.randn(shape, generator=g).to(device)
    z_tgt = z_src + 0.1 * torch.randn(shape, generator=g).to(device)
    ids = (torch.arange(b) % len(table)).to(device)
    e_src, e_tgt = table.first(ids)
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    noise = torch.randn(shape, generator=g).to(device)
    results = {}
    hdr = (f"arch={setup.arch} device={device} teacher dtype={str(tdt).replace('torch.', '')} batch={b} "
           f"threads={torch.get_num_threads()}; medians of {rounds} interleaved rounds")

    def call(tch, mode="no_grad"):
        def f():
            if mode == "graph":  # what an implementation without no_grad and with z requiring grad would keep
                z = z_tgt.clone().requires_grad_(True)
                with torch.enable_grad():
                    eps = tch.unet(torch.cat([z] * 4).to(tch.dtype), t.repeat(4),
                                   encoder_hidden_states=torch.cat([e_src, e_src, e_tgt, e_tgt]).to(tch.dtype)).sample
                return eps
            ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
            with ctx:
                return dds_grad(tch, z_src, z_tgt, e_src.to(tch.dtype), e_tgt.to(tch.dtype), t=t, noise=noise,
                                guidance_scale=Guidance.guidance)
        return f

    # 1. teacher without autograd graph
    results["teacher autograd"] = interleaved(
        {"no_grad (dds_grad as shipped)": call(teacher), "inference_mode": call(teacher, "inference_mode"),
         "autograd graph kept (naive)": call(teacher, "graph")}, rounds, warm, sync, mem)
    # 2. attention processor
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    u_classic = copy.deepcopy(teacher.unet)
    u_classic.set_attn_processor(AttnProcessor())
    u_sdpa = copy.deepcopy(teacher.unet)
    u_sdpa.set_attn_processor(AttnProcessor2_0())
    results["attention"] = interleaved(
        {"AttnProcessor2_0 (SDPA, diffusers default)": call(_teacher_variant(teacher, u_sdpa)),
         "AttnProcessor (classic bmm+softmax)": call(_teacher_variant(teacher, u_classic))}, rounds, warm, sync, mem)
    del u_classic
    # 3. channels_last
    u_cl = copy.deepcopy(teacher.unet).to(memory_format=torch.channels_last)
    results["memory format"] = interleaved(
        {"contiguous (NCHW)": call(teacher), "channels_last (NHWC)": call(_teacher_variant(teacher, u_cl))},
        rounds, warm, sync, mem)
    del u_cl
    # 4. half precision teacher (GPU)
    if device.type == "cuda":
        variants = {}
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            u = copy.deepcopy(teacher.unet).to(dt)
            variants[f"teacher {name}"] = call(_teacher_variant(teacher, u))
        results["teacher precision"] = interleaved(variants, rounds, warm, sync, mem)
        del variants
    # 5. torch.compile of the teacher UNet
    if args.compile:
        u_c = copy.deepcopy(teacher.unet)
        u_c.compile()
        tc = _teacher_variant(teacher, u_c)
        sync()
        t0 = time.perf_counter()
        call(tc)()
        sync()
        compile_s = time.perf_counter() - t0
        results["torch.compile (teacher)"] = interleaved({"eager": call(teacher), "compiled": call(tc)}, rounds, warm, sync, mem)
        results["torch.compile (teacher)"]["compiled"]["note"] = f"first call (compilation) {compile_s:.1f} s"
    # 6. prompt embeddings: text encoder vs memory cache vs disk cache
    prompts = [p for task in setup.tasks for k in ("source", "target")
               for p in ([task[k]] if isinstance(task[k], str) else task[k])]
    from ddstrans.teacher import Teacher

    def encode_fresh():
        tch = copy.copy(teacher)
        tch._memory_cache, tch._uncond, tch.cache_dir = {}, None, None
        tch.encode_prompts(prompts)

    disk_dir = workdir / "emb_disk"
    warm_t = copy.copy(teacher)
    warm_t._memory_cache, warm_t.cache_dir = {}, disk_dir
    warm_t.encode_prompts(prompts)

    def encode_disk():
        tch = copy.copy(teacher)
        tch._memory_cache, tch.cache_dir = {}, disk_dir
        tch.encode_prompts(prompts)

    results["prompt embeddings"] = interleaved(
        {f"text encoder ({len(prompts)} prompts)": encode_fresh, "disk cache hit (safetensors)": encode_disk,
         "memory cache hit": lambda: warm_t.encode_prompts(prompts),
         "TaskTable.sample (per training step)": lambda: table.sample(ids, torch.Generator().manual_seed(0))},
        rounds, warm, sync, mem)
    assert isinstance(teacher, Teacher)
    # 7. cached latents: VAE encode share of a step
    if teacher.vae is not None:
        s = setup.image_size()
        px = (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(device)
        gen = copy.deepcopy(module.generator).to(device).train()
        opt = torch.optim.AdamW(gen.parameters(), lr=LR)

        def step(encode):
            def f():
                with torch.enable_grad():
                    z = teacher.encode_images(px) if encode else z_src
                    with autocast_ctx(device, dtype):
                        out = gen(z, task_ids=ids)
                        gr = Guidance().grad(teacher, z, out.detach().float(), e_src, e_tgt)
                    opt.zero_grad(set_to_none=True)
                    surrogate_loss(out.float(), gr).backward()
                opt.step()
            return f

        results["cached latents"] = interleaved(
            {"VAE encode of the batch": lambda: teacher.encode_images(px), "step from pixels (VAE encode)": step(True),
             "step from cached latents": step(False)}, rounds, warm, sync, mem)
        del gen, opt
    # 8. gradient checkpointing of a larger generator
    from ddstrans.generator import build_generator

    if device.type == "cuda":
        gk = dict(setup.gen_kwargs, copy_teacher_architecture=True) if setup.arch == "sd15" else dict(
            block_out_channels=(128, 256, 384), layers_per_block=2, num_task_tokens=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
        gb = b
    else:  # configs/generator/small.yaml (~30M params) at 4x32x32 latents, batch 2
        gk = dict(block_out_channels=(128, 256, 384), layers_per_block=2, num_task_tokens=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
        gb = 2
    gk = {k: v for k, v in gk.items() if k not in ("gradient_checkpointing",)}
    gshape = (gb, 4, 32, 32) if device.type == "cpu" else (gb, *setup.latent_shape())
    kw_teacher = {"teacher": teacher} if (device.type == "cuda" and setup.arch == "sd15") else {
        "in_channels": 4, "sample_size": gshape[-1], "cross_attention_dim": 768}
    if "teacher" in kw_teacher:
        gk["copy_teacher_architecture"] = True
    gens = {}
    for name, on in (("generator, no checkpointing", False), ("generator, gradient checkpointing", True)):
        torch.manual_seed(0)
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            gen = build_generator(num_tasks=len(table), gradient_checkpointing=on, **kw_teacher, **gk)
        gen = gen.to(device).train()
        gens[name] = gen
    zz = torch.randn(gshape, generator=g).to(device)
    gg = torch.randn(gshape, generator=g).to(device)
    gids = (torch.arange(gb) % len(table)).to(device)

    def fwd_bwd(gen):
        def f():
            with torch.enable_grad(), autocast_ctx(device, dtype):
                out = gen(zz, task_ids=gids)
            surrogate_loss(out.float(), gg).backward()
            for p in gen.parameters():
                p.grad = None
        return f

    nparams = sum(p.numel() for p in next(iter(gens.values())).parameters()) / 1e6
    results["gradient checkpointing"] = interleaved({k: fwd_bwd(v) for k, v in gens.items()},
                                                    max(4, rounds // 3), 1, sync, mem)
    results["gradient checkpointing"]["_note"] = f"{nparams:.1f}M-param generator, batch {tuple(gshape)}"
    del gens, module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # 9. per-step costs inside the LightningModule (pending module.py changes), Lightning fits in cycles
    variants = module_variants(setup, args.teacher_dtype, device)
    steps = 6 if args.quick else 12
    per = {k: [] for k in variants}
    loader = make_loader(setup, b, steps + 2, args.data)
    for _cycle in range(1 if device.type == "cuda" else (2 if args.quick else 3)):
        for k, build in variants.items():  # one module alive at a time (SD-scale: ~17 GB each with AdamW + EMA)
            m = build()
            per[k] += lightning_step_times(m, loader, steps, device, dtype, workdir, sync)[2:]
            del m
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["module per-step costs"] = {k: {"ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                                            "peak_mb": float("nan")} for k, v in per.items()}

    print(f"\n## optimisation ablations: {hdr}\n")
    print("| what | variant | median ms | min ms | peak above start (MB) |")
    print("|---|---|---:|---:|---:|")
    for group, rows in results.items():
        note = rows.pop("_note", None) if isinstance(rows, dict) else None
        for k, v in rows.items():
            extra = f" ({v['note']})" if "note" in v else ""
            print(f"| {group}{' (' + note + ')' if note else ''} | {k}{extra} | {v['ms']:.2f} | {v.get('min_ms', float('nan')):.2f} | {v['peak_mb']:.1f} |")
    if args.json:
        Path(args.json).with_suffix(".ablations.json").write_text(json.dumps(results, indent=2, default=str))
    return results
