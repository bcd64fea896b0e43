"""The benchmark's setups: teachers of each architecture (tiny, the shipped shapes teacher, SD-1.5-shaped and the
larger families with random weights), the generator and module built as ``configs/`` would, in-memory batches,
and the memory and clock helpers every measurement shares. The configs' defaults the benchmark mirrors are
constants here, so the step measured is the step a default run takes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
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
