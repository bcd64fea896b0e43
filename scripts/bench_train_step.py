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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddstrans.guidance import Guidance

REPO = Path(__file__).resolve().parents[1]
SHAPES_TEACHER = REPO / "checkpoints" / "shapes-teacher"

TINY_GEN = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8,
                num_task_tokens=1)
SMOKE_TASKS = [{"name": "cat2lion", "source": ["a photo of a cat", "a cat"], "target": ["a photo of a lion", "a lion"]},
               {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]
SHAPES_TASKS = [{"name": f"red2{c}", "source": [f"a red {s} on a striped background" for s in ("circle", "square")],
                 "target": [f"a {c} {s} on a striped background" for s in ("circle", "square")]}
                for c in ("blue", "green", "yellow")]
SD_TASKS = [{"name": f"cat2{a}", "source": ["a photo of a cat", "a cat"], "target": [f"a photo of a {a}", f"a {a}"]}
            for a in ("lion", "dog", "squirrel")]
# configs/ defaults the benchmark mirrors (loss/dds.yaml, optim/adamw.yaml, trainer/default.yaml, logger/csv.yaml)
LOSS = {"method": "dds", "guidance_start": 1.0, "warmup_steps": 1000}  # loss/dds.yaml's changes to the defaults
EMA = {"enabled": True, "decay": 0.999, "update_after_step": 0, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.6667}
LR, LR_WARMUP, GRAD_CLIP, LOG_EVERY = 1e-4, 100, 1.0, 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- memory and clocks
class Memory:
    """Peak memory of a phase. CUDA: allocator stats. CPU: process RSS high-water mark (VmHWM), reset by writing 5
    to /proc/self/clear_refs (Linux), after ``malloc_trim`` so freed heap is returned first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._libc = None
        if not self.cuda:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
        self.can_reset = self.cuda or self._clear_refs()

    @staticmethod
    def _status(key: str) -> int:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _clear_refs(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else self._status("VmRSS")

    def reset(self) -> int:
        """Reset the peak; returns the current level (the phase's start)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            self._clear_refs()
        return self.current()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else self._status("VmHWM")


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def tensor_bytes(modules) -> int:
    seen, n = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n


MB = 1024 * 1024


# ---------------------------------------------------------------------- teachers / setups
def build_sd15_teacher(device: torch.device, dtype: torch.dtype, base: int = 320):
    """A Stable-Diffusion-1.5-shaped teacher with random weights, built directly on ``device``.

    UNet: diffusers defaults = SD 1.5 layout (``base`` x 1/2/4/4 channels, 2 layers per block, attention head dim 8)
    with cross-attention width 768 at 64x64 latents; VAE: SD's layout (128/256/512/512, scale 0.18215);
    text encoder: one CLIP layer of width 768 (prompt embeddings are cached, its size does not matter)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddstrans.teacher import Teacher
    from ddstrans.testing import TINY_WORDS
    from ddstrans.word_tokenizer import make_word_tokenizer

    tok = make_word_tokenizer([*TINY_WORDS, "photograph", "squirrel"], model_max_length=77)
    vb = max(32, base * 128 // 320)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(base, 2 * base, 4 * base, 4 * base),
                                    cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(vb, 2 * vb, 4 * vb, 4 * vb),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, steps_offset=1)
    teacher = Teacher(unet, sched, text_encoder, tok, vae, identity=f"sd15-shaped-random-{base}", cache_dir=None)
    teacher.source = "sd15-shaped random (benchmark)"
    return teacher.to(device, dtype)


SMALL_GEN = dict(block_out_channels=(128, 256, 384), layers_per_block=2, num_task_tokens=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=8, norm_num_groups=32)


def _one_layer_clip(tok, width: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=max(1, width // 64), max_position_embeddings=77,
                         projection_dim=projection or width, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _sd_vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024, **kw)


def build_family_teacher(arch: str, device: torch.device, dtype: torch.dtype, reduced: bool):
    """An SDXL / SD3.5-medium / FLUX.1-dev-shaped teacher with random weights (see the module docstring)."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from ddstrans.teacher.pipeline import PIPELINE_TEACHERS
    from ddstrans.testing import TINY_WORDS, make_word_t5_tokenizer
    from ddstrans.word_tokenizer import make_word_tokenizer

    words = [*TINY_WORDS, "photograph", "squirrel"]
    tok, tok2 = make_word_tokenizer(words, 77), make_word_tokenizer(words, 77)
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "sdxl":
            unet = diffusers.UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                transformer_layers_per_block=(1, 1, 2) if reduced else (1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=_sd_vae(4, scaling_factor=0.13025), text_encoder=_one_layer_clip(tok, 768),
                text_encoder_2=_one_layer_clip(tok2, 1280, 1280), tokenizer=tok, tokenizer_2=tok2, unet=unet,
                scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                           beta_schedule="scaled_linear", steps_offset=1))
        else:
            tok3 = make_word_t5_tokenizer(words, model_max_length=512)
            t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=4096, d_kv=64, d_ff=1024, num_layers=1,
                                         num_heads=64, pad_token_id=0, eos_token_id=1))
            if arch == "sd3":
                layers = 4 if reduced else 24
                tr = diffusers.SD3Transformer2DModel(
                    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, pos_embed_max_size=192 if reduced else 384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(min(13, layers))))
                pipe = diffusers.StableDiffusion3Pipeline(
                    transformer=tr, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                    vae=_sd_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                use_post_quant_conv=False),
                    text_encoder=_one_layer_clip(tok, 768, 768), tokenizer=tok,
                    text_encoder_2=_one_layer_clip(tok2, 1280, 1280), tokenizer_2=tok2, text_encoder_3=t5,
                    tokenizer_3=tok3)
            else:
                tr = diffusers.FluxTransformer2DModel(
                    patch_size=1, in_channels=64, num_layers=1 if reduced else 19, num_single_layers=2 if reduced else 38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
                sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                  max_shift=1.15)
                pipe = diffusers.FluxPipeline(
                    transformer=tr, scheduler=sched, vae=_sd_vae(16, scaling_factor=0.3611, shift_factor=0.1159,
                                                                 use_quant_conv=False, use_post_quant_conv=False),
                    text_encoder=_one_layer_clip(tok, 768), tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok3)
    teacher = PIPELINE_TEACHERS[arch](pipe, identity=f"{arch}-shaped-random-{'reduced' if reduced else 'full'}",
                                      cache_dir=None)
    teacher.source = f"{arch}-shaped random ({'reduced depth' if reduced else 'full size'}, benchmark)"
    return teacher.to(device, dtype)


@dataclass
class Setup:
    arch: str
    teacher: object
    tasks: list
    gen_kwargs: dict
    note: str = ""
    teacher_dir: Path | None = None
    extra: dict = field(default_factory=dict)
    latent_hw: int | None = None  # None: the teacher's own sample size

    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.latent_hw or self.teacher.latent_size)
        return (self.teacher.latent_channels, s, s)

    def image_size(self) -> int:
        return self.latent_shape()[-1] * self.teacher.downsample_factor


def build_setup(arch: str, device: torch.device, dtype: torch.dtype, workdir: Path, grad_ckpt: str = "auto",
                sd15_base: int = 320, layers: str = "auto", resolution: int | None = None, gen: str = "small") -> Setup:
    from ddstrans.teacher import Teacher

    cache = workdir / "prompt_cache"
    if arch in ("sdxl", "sd3", "flux"):
        reduced = layers == "reduced" or (layers == "auto" and device.type != "cuda")
        teacher = build_family_teacher(arch, device, dtype, reduced)
        res = int(resolution or (1024 if device.type == "cuda" else 256))
        if res % teacher.image_multiple:
            raise ValueError(f"--resolution {res} must be a multiple of {teacher.image_multiple} for {arch}")
        ckpt = grad_ckpt == "on" or (grad_ckpt == "auto" and gen == "from_teacher")
        kw = dict(copy_teacher_architecture=True, num_task_tokens=4) if gen == "from_teacher" else dict(SMALL_GEN)
        kw["gradient_checkpointing"] = ckpt
        depth = "reduced depth" if reduced else "full size"
        evals = 2 if teacher.guidance_mode != "cfg" else 4
        return Setup(arch, teacher, SD_TASKS, kw, latent_hw=res // teacher.downsample_factor,
                     note=f"{arch}-shaped random teacher ({depth}, {res} px, {evals} evaluations per DDS sample); "
                          f"generator {gen}")
    if arch == "shapes":
        if not (SHAPES_TEACHER / "unet").is_dir():
            log(f"[bench] {SHAPES_TEACHER} not found (the shapes teacher is not shipped yet): FALLING BACK to --arch tiny")
            arch = "tiny"
        else:
            try:
                teacher = Teacher.from_pretrained(SHAPES_TEACHER, cache_dir=cache)
            except Exception as e:  # noqa: BLE001 - e.g. being rewritten by its training run right now
                log(f"[bench] cannot load {SHAPES_TEACHER} ({str(e).splitlines()[0]}): FALLING BACK to --arch tiny")
                arch = "tiny"
            else:
                kw = dict(copy_teacher_architecture=True, num_task_tokens=1,
                          gradient_checkpointing=grad_ckpt == "on")
                return Setup("shapes", teacher, SHAPES_TASKS, kw, note="shapes teacher (pixel space, 3x32x32); "
                             "generator = teacher UNet layout (2.45M params)", teacher_dir=SHAPES_TEACHER)
    if arch == "tiny":
        from ddstrans.testing import make_tiny_sd

        d = workdir / "tiny-teacher"
        if not (d / "unet").is_dir():
            make_tiny_sd(d)
        teacher = Teacher.from_pretrained(d, cache_dir=cache)
        kw = dict(TINY_GEN, gradient_checkpointing=grad_ckpt == "on")
        return Setup("tiny", teacher, SMOKE_TASKS, kw, note="tiny random teacher (VAE, 4x8x8 latents); tiny generator",
                     teacher_dir=d)
    if arch == "sd15":
        teacher = build_sd15_teacher(device, dtype, sd15_base)
        kw = dict(copy_teacher_architecture=True, num_task_tokens=4, gradient_checkpointing=grad_ckpt != "off")
        return Setup("sd15", teacher, SD_TASKS, kw, note=f"SD-1.5-shaped random teacher (base {sd15_base}, 64x64 latents); "
                     f"generator = same UNet layout, gradient checkpointing {'on' if kw['gradient_checkpointing'] else 'off'}")
    raise ValueError(f"unknown arch {arch!r}")


class InMemoryBatches(torch.utils.data.Dataset):
    """Deterministic samples, built once: ``{"latents"}`` (cached latents) or ``{"pixels"}`` in [-1, 1]."""

    def __init__(self, setup: Setup, n: int, kind: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind == "latents":
            self.x = torch.randn(n, *setup.latent_shape(), generator=g)
        else:
            s = setup.image_size()
            self.x = (torch.rand(n, 3, s, s, generator=g) * 2 - 1)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {self.kind: self.x[i]}


def make_loader(setup: Setup, batch: int, n_steps: int, kind: str, seed: int = 0):
    return torch.utils.data.DataLoader(InMemoryBatches(setup, batch * n_steps, kind, seed), batch_size=batch,
                                       shuffle=False, drop_last=True, num_workers=0)


def make_module(setup: Setup, teacher_dtype="auto", seed: int = 0, device: torch.device | None = None):
    """The module as the Hydra app builds it; on CUDA the generator is initialised directly on the GPU (an SD-scale
    random init on the CPU takes minutes)."""
    from diffusers.optimization import get_scheduler

    from ddstrans.generator import build_generator
    from ddstrans.module import DDSTranslationModule

    torch.manual_seed(seed)
    generator = functools.partial(build_generator, **setup.gen_kwargs)
    if device is not None and device.type == "cuda":
        with torch.device(device):
            generator = generator(teacher=setup.teacher, num_tasks=len(setup.tasks))
    return DDSTranslationModule(
        setup.teacher, setup.tasks, generator, loss=dict(LOSS),
        optimizer=functools.partial(torch.optim.AdamW, lr=LR, betas=(0.9, 0.999), weight_decay=0.0),
        scheduler=functools.partial(get_scheduler, name="constant_with_warmup", num_warmup_steps=LR_WARMUP),
        ema=dict(EMA), validation={"num_images": 0, "save_png": False, "log_images": False},
        teacher_dtype=teacher_dtype, seed=seed)


def precision_of(dtype: torch.dtype) -> str:
    return {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------- the b, c, d measurements
class Components:
    """(b) teacher four-way call, (c) generator fwd+bwd, (d) the plain PyTorch step; each on its own state."""

    def __init__(self, module, gen_init, setup: Setup, batch: int, n_steps: int, data_kind: str, device, dtype, sync):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.module, self.setup, self.device, self.dtype, self.sync = module, setup, device, dtype, sync
        self.teacher = setup.teacher
        self.table = module.task_table
        self.loss_cfg = module.loss_cfg
        g = torch.Generator().manual_seed(1)
        shape = (batch, *setup.latent_shape())
        self.z_src = torch.randn(shape, generator=g).to(device)
        self.z_tgt = (self.z_src + 0.1 * torch.randn(shape, generator=g).to(device))
        ids = torch.arange(batch) % len(self.table)
        self.ids = ids.to(device)
        self.emb_src, self.emb_tgt = self.table.first(self.ids)
        self.fixed_grad = torch.randn(shape, generator=g).to(device)
        self.rng_b = torch.Generator().manual_seed(2)
        # (c): its own generator copy
        self.gen_c = copy.deepcopy(gen_init).to(device).train()
        # (d): its own generator, optimizer, schedule, EMA, RNG, DataLoader
        self.gen_d = copy.deepcopy(gen_init).to(device).train()
        params = [p for p in self.gen_d.parameters() if p.requires_grad]
        self.opt_d = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
        self.sched_d = get_scheduler("constant_with_warmup", optimizer=self.opt_d, num_warmup_steps=LR_WARMUP)
        c = EMA
        self.ema_d = EMAModel(self.gen_d.parameters(), decay=c["decay"], update_after_step=c["update_after_step"],
                              use_ema_warmup=c["use_ema_warmup"], inv_gamma=c["inv_gamma"], power=c["power"])
        self.ema_d.to(device)
        self.rng_d = torch.Generator().manual_seed(3)
        self.loader_d = make_loader(setup, batch, n_steps, data_kind, seed=5)
        self.iter_d = iter(self.loader_d)
        self.step_d = 0

    def teacher_call(self):
        from ddstrans.scores import dds_grad

        tdt = self.teacher.dtype
        with autocast_ctx(self.device, self.dtype):
            return dds_grad(self.teacher, self.z_src, self.z_tgt, self.emb_src.to(tdt), self.emb_tgt.to(tdt),
                            guidance_scale=self.module.guidance.guidance, t_range=self.module.guidance.t_range,
                            generator=self.rng_b)

    def generator_fwd_bwd(self):
        from ddstrans.scores import surrogate_loss

        with torch.enable_grad(), autocast_ctx(self.device, self.dtype):
            out = self.gen_c(self.z_src, task_ids=self.ids, src_emb=self.emb_src, tgt_emb=self.emb_tgt)
        surrogate_loss(out.float(), self.fixed_grad).backward()
        for p in self.gen_c.parameters():
            p.grad = None

    def plain_step(self):
        from ddstrans.scores import surrogate_loss

        try:
            batch = next(self.iter_d)
        except StopIteration:
            self.iter_d = iter(self.loader_d)
            batch = next(self.iter_d)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        c, teacher, rng = self.loss_cfg, self.teacher, self.rng_d
        with torch.enable_grad():
            z_src = (batch["latents"].float() if "latents" in batch else teacher.encode_images(batch["pixels"]).float())
            b = z_src.shape[0]
            ids = torch.randint(len(self.table), (b,), generator=rng).to(self.device)
            emb_src, emb_tgt = self.table.sample(ids, rng)
            with autocast_ctx(self.device, self.dtype):
                z_tgt = self.gen_d(z_src, task_ids=ids, src_emb=emb_src, tgt_emb=emb_tgt)
                grad = self.module.guidance.grad(teacher, z_src, z_tgt.detach().float(), emb_src, emb_tgt, self.step_d,
                                                 generator=rng)
                loss = surrogate_loss(z_tgt.float(), grad, c["reduction"]) * c["weight"]
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.gen_d.parameters(), GRAD_CLIP)
        self.opt_d.step()
        self.sched_d.step()
        self.ema_d.step(self.gen_d.parameters())
        self.step_d += 1


def _lightning_callback_cls():
    import lightning as L

    class RoundTimer(L.Callback):
        """Times (a) per loop iteration and runs one round of b, c, d right after each training batch."""

        def __init__(self, comps_factory, warmup: int, mem: Memory, sync):
            self.comps_factory, self.comps = comps_factory, None
            self.warmup, self.mem, self.sync = warmup, mem, sync
            self.starts, self.windows, self.extras = [], [], []
            self.times = {"b": [], "c": [], "d": []}
            self.peaks = {"a": [], "b": [], "c": [], "d": []}
            self.peaks_abs = {"a": [], "b": [], "c": [], "d": []}
            self.k = 0
            self._mem0 = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.sync()
            self._mem0 = self.mem.reset()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sync()
            t_end = time.perf_counter()
            self.windows.append(t_end - self.starts[-1])
            measured = self.k >= self.warmup
            if measured:
                self.peaks["a"].append(self.mem.peak() - self._mem0)
                self.peaks_abs["a"].append(self.mem.peak())
            if self.comps is None:
                self.comps = self.comps_factory()
            order = [("b", self.comps.teacher_call), ("c", self.comps.generator_fwd_bwd), ("d", self.comps.plain_step)]
            r = self.k % 3
            for name, fn in order[r:] + order[:r]:
                m0 = self.mem.reset()
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                dt = time.perf_counter() - t0
                if measured:
                    self.times[name].append(dt)
                    self.peaks[name].append(self.mem.peak() - m0)
                    self.peaks_abs[name].append(self.mem.peak())
            self.extras.append(time.perf_counter() - t_end)
            self.k += 1

        def iteration_times(self) -> list[float]:
            """(a): next start - this start - the time spent in this script's b/c/d round."""
            return [self.starts[i + 1] - self.starts[i] - self.extras[i] for i in range(len(self.starts) - 1)]

    return RoundTimer


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


def quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import lightning  # noqa: F401 - it sets its loggers' levels on import: import first, then quiet them

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


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
