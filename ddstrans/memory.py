"""A small memory model of one DDS training step: weights + gradients + optimizer + EMA + activations per layer.

Why: the memory table of docs/performance.md must exist before a GPU measures it, and a user should be able to ask
"does SD 1.5 at 512 px, batch 4, LoRA fit 16 GB?" without renting one. Nothing here allocates real weights: the
UNets are built on PyTorch's ``meta`` device from ``configs/arch`` and run there, so shapes (and so bytes) are exact
at any resolution while no memory is used.

- parameters: counted on the meta-device models (exact);
- activations: every tensor autograd saves during the generator's forward (``saved_tensors_hooks``), deduplicated,
  parameters excluded, attributed to the UNet's checkpointable units (ResNet and transformer blocks). With gradient
  checkpointing a unit keeps only its inputs, and the backward recomputes one unit at a time:
  ``saved - sum(unit saved) + sum(unit inputs) + max(unit saved)``;
- attention: ``sdpa`` is modelled as a fused kernel that saves q, k, v, output and a log-sum-exp row (what flash /
  memory-efficient attention keep); ``eager`` materialises the attention matrix;
- transients: the teacher's no-grad forward on the 4-way DDS batch ([uncond, cond] x [source, target]) and the VAE
  encoder (unless latents are cached) are modelled as three times their largest tensor (input, output, workspace);
  eager attention adds its score and probability matrices.

The predicted figure is ``torch.cuda.max_memory_allocated`` (CUDA context and allocator slack excluded).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass

import torch

from ddstrans.arch import arch_config

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Setting:
    arch: str = "sd15"
    resolution: int = 512
    batch: int = 1
    generator: str = "lora"  # lora | full
    precision: str = "bf16"  # activations/autocast: bf16 | fp16 | fp32
    teacher_dtype: str = "bf16"  # teacher (and LoRA base) weights
    gradient_checkpointing: bool = True
    attention: str = "sdpa"  # sdpa | eager
    optimizer: str = "adamw"  # adamw | adamw8bit
    cached_latents: bool = False
    ema: bool = True
    lora_rank: int = 8


def _unet_kwargs(arch: str, batch: int, hw: int, dtype, device="meta") -> dict:
    cfg = arch_config(arch, "unet")
    kw = {"encoder_hidden_states": torch.zeros(batch, 77, cfg["cross_attention_dim"], dtype=dtype, device=device)}
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, 1280, dtype=dtype, device=device),
                                   "time_ids": torch.zeros(batch, 6, dtype=dtype, device=device)}
    return kw


def meta_unet(arch: str, dtype=torch.float32, lora_rank: int | None = None):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch_config(arch, "unet")).to(dtype)
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        from ddstrans.lora import DEFAULT_TARGET_MODULES

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(DEFAULT_TARGET_MODULES)),
                                unet)
        for n, p in unet.named_parameters():
            p.requires_grad_(".lora_" in n or n.startswith("conv_out."))
    return unet


def parameter_counts(arch: str, lora_rank: int = 8) -> dict:
    """Parameters of the UNet, the LoRA generator's trainable tensors, the text encoder(s) and the VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = meta_unet(arch, lora_rank=lora_rank)
    n_unet = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
    n_lora = sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(arch_config(arch, "vae"))
        n_text = 0
        for part in ("text_encoder", "text_encoder_2"):
            try:
                c = arch_config(arch, part)
            except ValueError:
                continue
            n_text += sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**{k: v for k, v in c.items()
                                                                                if k != "architectures"})).parameters())
    return {"unet": n_unet, "lora_trainable": n_lora, "text": n_text, "vae": sum(p.numel() for p in vae.parameters())}


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused SDPA kernel while profiling: saves what flash attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - profiling never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _attention(kind: str):
    import torch.nn.functional as F

    if kind == "eager":
        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
            s = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
            return s.softmax(-1) @ v
    else:
        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
            return _FusedAttention.apply(q, k, v)
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


@functools.cache
def activation_profile(arch: str, resolution: int, batch: int, generator: str = "lora", precision: str = "bf16",
                       attention: str = "sdpa", lora_rank: int = 8) -> dict:
    """Bytes autograd saves in the generator's forward (total, per checkpointable unit) and the largest tensor of a
    no-grad forward at the same batch (for transients)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    unet = meta_unet(arch, dtype, lora_rank=lora_rank if generator == "lora" else None)
    if generator == "full":
        unet.requires_grad_(True)
    params = {id(p) for p in unet.parameters()}
    hw = resolution // 8
    seen: set[int] = set()
    keep = []
    state = {"unit": None, "total": 0}
    per_unit: dict[str, int] = {}
    unit_inputs: dict[str, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) in params or id(base) in seen:
            return t
        seen.add(id(base))
        keep.append(base)
        n = base.numel() * base.element_size()
        state["total"] += n
        if state["unit"] is not None:
            per_unit[state["unit"]] = per_unit.get(state["unit"], 0) + n
        return t

    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
            def pre(mod, args, kwargs, name=name):
                state["unit"] = name
                unit_inputs[name] = sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

            def post(mod, args, out, name=name):
                state["unit"] = None

            hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
    x = torch.zeros(batch, 4, hw, hw, dtype=dtype, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with _attention(attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, **_unet_kwargs(arch, batch, hw, dtype))
    for h in hooks:
        h.remove()
    unit_total = sum(per_unit.values())
    ckpt = state["total"] - unit_total + sum(unit_inputs.values()) + max(per_unit.values(), default=0)
    return {"saved": state["total"], "saved_checkpointed": ckpt, "max_unit": max(per_unit.values(), default=0)}


@functools.cache
def largest_tensor(arch: str, resolution: int, batch: int, part: str = "unet", dtype_bytes: int = 2,
                   attention: str = "sdpa") -> tuple[int, int]:
    """Bytes of the largest module output of a no-grad forward (UNet at ``batch``, or the VAE encoder), and of the
    largest attention matrices (scores and probabilities) eager attention materialises (0 for sdpa)."""
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    biggest = [0]

    def hook(mod, args, out):
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o):
                biggest[0] = max(biggest[0], o.numel() * o.element_size())

    attn = 0
    if part == "unet":
        from diffusers.models.attention import BasicTransformerBlock

        model = meta_unet(arch, dtype)
        hw = resolution // 8
        inputs = (torch.zeros(batch, 4, hw, hw, dtype=dtype, device="meta"),
                  torch.zeros(batch, dtype=torch.long, device="meta"))
        kwargs = _unet_kwargs(arch, batch, hw, dtype)
        if attention == "eager":
            heads = {m.attn1.heads for m in model.modules() if isinstance(m, BasicTransformerBlock)}
            cfg = arch_config(arch, "unet")
            first_attn = 0 if cfg["down_block_types"][0].startswith("CrossAttn") else 1
            n = (hw // 2**first_attn) ** 2
            attn = 2 * batch * max(heads) * n * n * dtype_bytes
    else:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            model = AutoencoderKL.from_config(arch_config(arch, "vae")).to(dtype).encoder
        inputs = (torch.zeros(batch, 3, resolution, resolution, dtype=dtype, device="meta"),)
        kwargs = {}
    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(*inputs, **kwargs)
    for h in hooks:
        h.remove()
    return biggest[0], attn


def predict(s: Setting, counts: dict | None = None) -> dict:
    """Predicted peak bytes of one training step, with its parts (GiB)."""
    counts = counts or parameter_counts(s.arch, s.lora_rank)
    tb = DTYPE_BYTES[s.teacher_dtype]
    teacher = (counts["unet"] + counts["text"] + counts["vae"]) * tb
    trainable = counts["unet"] if s.generator == "full" else counts["lora_trainable"]
    opt = {"adamw": 8, "adamw8bit": 2}[s.optimizer]
    cast_cache = trainable * 2 if (s.generator == "full" and s.precision != "fp32") else 0
    static = teacher + trainable * (4 + 4 + opt + (4 if s.ema else 0)) + cast_cache
    # every saved tensor and every transient is per sample: profiled at batch 1, scaled by the batch
    b = s.batch
    prof = activation_profile(s.arch, s.resolution, 1, s.generator, s.precision, s.attention, s.lora_rank)
    act = b * (prof["saved_checkpointed"] if s.gradient_checkpointing else prof["saved"])
    big, attn = largest_tensor(s.arch, s.resolution, 1, "unet", tb, s.attention)
    teacher_tr = 4 * b * (3 * big + attn)  # the 4-way DDS batch
    vae_tr = 0 if s.cached_latents else 3 * b * largest_tensor(s.arch, s.resolution, 1, "vae", tb)[0]
    backward_tr = 2 * b * prof["max_unit"] if s.gradient_checkpointing else 0
    peak = max(static + vae_tr, static + act + max(teacher_tr, backward_tr))
    return {"setting": asdict(s), "peak_gib": peak / GiB, "weights_gib": teacher / GiB,
            "trainable_state_gib": (static - teacher) / GiB, "activations_gib": act / GiB,
            "transient_gib": max(teacher_tr, backward_tr, vae_tr) / GiB, "trainable_params": trainable}


def predict_json(s: Setting) -> str:
    return json.dumps(predict(s), indent=2)
