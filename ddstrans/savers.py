"""Memory savers as config switches, and the checks of scale-related settings that run before heavy work.

Why one place: each saver trades something (precision, speed, a dependency) for memory, and each has a failure
mode best reported before the teacher is loaded (a missing library, a strategy that cannot run here). The switches:

- ``model.teacher_dtype``: the teacher, and with ``generator=lora_from_teacher`` the frozen base the adapters sit
  on, in ``bfloat16``/``float16`` (the trainable tensors stay float32).
- ``model.memory.attention``: ``sdpa`` (PyTorch's fused scaled-dot-product attention; diffusers' default) or
  ``eager`` (the plain attention that materialises the attention matrix; only for comparisons).
- ``model.memory.channels_last``: the teacher UNet in NHWC memory format.
- ``model.memory.compile_teacher``: ``torch.compile`` of the teacher UNet.
- ``generator.gradient_checkpointing``, ``data.use_latents`` (cached VAE latents), ``optim=adamw8bit``
  (bitsandbytes), ``trainer=fsdp``: elsewhere in the config; checked here.
"""

from __future__ import annotations

import importlib.util

from omegaconf import OmegaConf

ATTENTIONS = ("sdpa", "eager")
DEFAULT_MEMORY = {"attention": "sdpa", "channels_last": False, "compile_teacher": False}


def _sel(cfg, key, default=None):
    return OmegaConf.select(cfg, key, default=default)


def is_lora(cfg) -> bool:
    return str(_sel(cfg, "generator._target_", "")).endswith("build_lora_generator")


def check_config(cfg, error=ValueError, *, processes: int = 1) -> None:
    """Cheap checks (no teacher): LoRA rank, 8-bit optimizer library, FSDP settings, memory switches.

    ``processes`` is the number of training processes the config starts (devices x nodes), which FSDP needs >= 2.
    """
    if is_lora(cfg):
        rank = _sel(cfg, "generator.rank", 8)
        if rank is None or int(rank) <= 0:
            raise error(f"generator.rank={rank}: the LoRA rank must be >= 1")
        if "conv_out" in [str(t) for t in (_sel(cfg, "generator.target_modules", []) or [])]:
            raise error("generator.target_modules must not contain conv_out: the LoRA generator trains a "
                        "zero-initialised copy of conv_out in full")
    target = str(_sel(cfg, "optim.optimizer._target_", ""))
    if target.startswith("bitsandbytes") and importlib.util.find_spec("bitsandbytes") is None:
        raise error(f"optim.optimizer._target_={target} needs the bitsandbytes package, which is not installed "
                    "(pip install bitsandbytes; it needs a CUDA GPU); or use optim=adamw")
    strategy = _sel(cfg, "trainer.strategy", "auto")
    name = str(_sel(cfg, "trainer.strategy._target_", strategy) if OmegaConf.is_dict(strategy) else strategy)
    if "fsdp" in name.lower():
        accel = str(_sel(cfg, "trainer.accelerator", "auto"))
        if accel == "cpu":
            raise error("trainer=fsdp with trainer.accelerator=cpu: Lightning's FSDP strategy runs on GPUs only; on "
                        "CPU use trainer=ddp (several processes) or trainer=cpu")
        if processes < 2:
            raise error("trainer=fsdp shards the generator over several processes, but the config starts one "
                        "(trainer.devices=1); use trainer.devices>=2, or trainer=default/gpu for one device")
        if is_lora(cfg):
            raise error("trainer=fsdp with generator=lora_from_teacher: the LoRA generator shares the replicated "
                        "teacher's weights and trains a few MB; use trainer=ddp")
        if _sel(cfg, "optim.ema.enabled", False):
            raise error("trainer=fsdp with optim.ema.enabled=true: the EMA of a sharded generator is not kept; "
                        "pass optim.ema.enabled=false")
    memory = {**DEFAULT_MEMORY, **(OmegaConf.to_container(_sel(cfg, "model.memory"), resolve=True)
                                   if _sel(cfg, "model.memory") is not None else {})}
    if memory["attention"] not in ATTENTIONS:
        raise error(f"model.memory.attention={memory['attention']}: must be one of {', '.join(ATTENTIONS)}")


def check_with_teacher(cfg, teacher, error=ValueError) -> None:
    """LoRA target modules against the loaded teacher's UNet (before the adapters are injected)."""
    if not is_lora(cfg):
        return
    from diffusers import UNet2DConditionModel

    from ddstrans.lora import DEFAULT_TARGET_MODULES, check_target_modules

    if not isinstance(teacher.model, UNet2DConditionModel):
        raise error(f"generator=lora_from_teacher puts adapters on a UNet teacher's denoiser; this "
                    f"{getattr(teacher, 'family', '')} teacher's is a {type(teacher.model).__name__}: use a UNet "
                    "generator (generator=small or a config of your own)")
    targets = _sel(cfg, "generator.target_modules", None) or DEFAULT_TARGET_MODULES
    try:
        check_target_modules((n for n, _ in teacher.model.named_modules()), list(targets))
    except ValueError as e:
        raise error(f"generator.{e}") from None


def apply_teacher_savers(teacher, memory=None) -> dict:
    """Apply ``model.memory`` to a loaded teacher; returns the settings used."""
    m = {**DEFAULT_MEMORY, **dict(memory or {})}
    if m["attention"] not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {m['attention']!r}")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if isinstance(teacher.model, UNet2DConditionModel):
        teacher.model.set_attn_processor(AttnProcessor2_0() if m["attention"] == "sdpa" else AttnProcessor())
    elif m["attention"] != "sdpa":  # transformer teachers (SD3, Flux) come with their own SDPA processors
        raise ValueError(f"attention={m['attention']!r} applies to UNet teachers; a {type(teacher.model).__name__} "
                         "keeps its own scaled-dot-product attention processors")
    if m["channels_last"]:
        teacher.set_channels_last(True)
    if m["compile_teacher"]:
        teacher.compile()
    return m


def fsdp_block_classes() -> set:
    """The diffusers UNet blocks FSDP wraps and checkpoints one by one (``trainer=fsdp``)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return {BasicTransformerBlock, ResnetBlock2D}
