"""The LoRA generator: the teacher's own denoiser with low-rank adapters, sharing one copy of its weights.

Why: ``generator=from_teacher`` copies the teacher UNet and trains all of it (SD 1.5: 0.86B parameters, about
14 GB of weights, gradients and AdamW state before any activation). Here the generator *is* the teacher's UNet
object with PEFT LoRA adapters injected into it. The adapters are switched on only inside the generator's own
forward (and inside the recomputation of a gradient-checkpointed block); everywhere else, in particular in every
teacher evaluation of the DDS step, the same module runs with the adapters off and computes the plain teacher.

Identity at initialisation: PEFT starts every ``lora_B`` at zero, and the UNet's last layer (``conv_out``) gets a
trainable twin that is zero-initialised and used only in generator mode (:class:`GeneratorConvOut`), so
``z_out = z_in + conv_out'(features) = z_in`` before the first step, as with the other generators.

Conditioning: ``task_id`` learns one token sequence per task, initialised from the task's target-prompt embedding
(:meth:`LoRATeacherGenerator.init_from_tasks_`), so the teacher sees at step 0 the prompt it was trained on;
``text`` feeds the prompt embeddings (``text_mode``: ``target`` = the target prompt, ``concat`` = source then
target tokens, ``delta`` = target and target - source, ``changed`` = target and its tokens weighted by how much they differ
from the source's (``ddstrans.generator.change_weights``); a learned, zero-initialised segment embedding per half).
SDXL's UNet also takes a pooled text embedding and micro-conditioning time ids in every call; the generator passes
them too (``ddstrans.generator.added_conditioning``): the target prompt's pooled embedding, or for task ids a learned
one per task initialised from it, and the pipeline's time ids for the image size (those of the teacher's calls).

Only the trainable tensors (adapters, ``conv_out`` twin, task tokens / segment embedding) are in the
``state_dict``: checkpoints stay small and hold no copy of the teacher. :func:`merge_to_translation_unet` folds
the adapters into a self-contained ``TranslationUNet`` for export.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

# img2img-turbo's pix2pix-turbo UNet adapter (GaParmar/img2img-turbo, src/pix2pix_turbo.py): LoraConfig(r=8,
# init_lora_weights="gaussian", target_modules=[...]) with PEFT's default lora_alpha=8. Its list also names
# "conv_out"; here conv_out is trained in full (zero-initialised), so it is left out.
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
                          "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")
TEXT_MODES = ("target", "concat", "delta", "changed")


class GeneratorConvOut(nn.Module):
    """The UNet's output layer with a trainable twin: the twin (zero-initialised) in generator mode, the frozen
    original otherwise. Runs the twin in its own dtype (fp32 while the base may be half precision)."""

    def __init__(self, base: nn.Conv2d):
        super().__init__()
        self.base = base
        self.twin = copy.deepcopy(base).float().requires_grad_(True)
        nn.init.zeros_(self.twin.weight)
        nn.init.zeros_(self.twin.bias)
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.base(x)
        return self.twin(x.to(self.twin.weight.dtype)).to(x.dtype)


def _tuner_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def check_target_modules(module_names, target_modules) -> None:
    """``ValueError`` naming every entry of ``target_modules`` that matches no module (PEFT's rule: the full name
    or its dotted suffix), and ``conv_out`` (trained in full here)."""
    targets = [str(t) for t in target_modules]
    if not targets:
        raise ValueError("lora target_modules is empty: name at least one module (e.g. to_q, to_k, to_v)")
    if "conv_out" in targets:
        raise ValueError("lora target_modules must not contain conv_out: the LoRA generator trains a "
                         "zero-initialised copy of conv_out in full")
    names = list(module_names)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if n})[:12]
        raise ValueError(f"lora target_modules {missing} match no module of the teacher's UNet "
                         f"(module names end in e.g. {', '.join(examples)})")


class LoRATeacherGenerator(nn.Module):
    """``z_out = z_in + unet_lora(z_in, timestep, context)``, the UNet shared with the teacher.

    Has a diffusers-style ``config`` (``conditioning``, ``num_tasks``, ``text_mode``, ``rank``, ``alpha``,
    ``target_modules``, ``timestep``, ``num_task_tokens``, ``cross_attention_dim``, ``dropout``) for checkpoints
    and export.
    """

    def __init__(self, unet, *, conditioning: str = "task_id", num_tasks: int = 1, text_mode: str = "target",
                 rank: int = DEFAULT_RANK, alpha: float | None = DEFAULT_ALPHA,
                 target_modules=DEFAULT_TARGET_MODULES, timestep: int = 0, num_task_tokens: int = 1,
                 dropout: float = 0.0, gradient_checkpointing: bool = False, downsample_factor: int = 8):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        if conditioning not in ("task_id", "text"):
            raise ValueError(f"conditioning must be task_id or text, got {conditioning!r}")
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        if int(rank) <= 0:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        if alpha is not None and float(alpha) <= 0:
            raise ValueError(f"lora alpha must be > 0, got {alpha}")
        if not 0 <= int(timestep) < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {timestep}")
        if conditioning == "task_id" and (int(num_tasks) < 1 or int(num_task_tokens) < 1):
            raise ValueError("task_id conditioning needs num_tasks >= 1 and num_task_tokens >= 1")
        if _tuner_layers(unet) or isinstance(unet.conv_out, GeneratorConvOut):
            raise ValueError("this UNet already carries adapters: one LoRA generator per teacher")
        added = getattr(unet.config, "addition_embed_type", None)
        if added not in (None, "text", "text_time"):
            raise ValueError(f"the LoRA generator adapts UNets without added conditioning, with a pooled-text "
                             f"embedding ('text') or with SDXL's text_time; this UNet has addition_embed_type={added!r}")
        pooled_dim = time_dim = 0
        if added == "text_time":
            time_dim = int(unet.config.addition_time_embed_dim)
            pooled_dim = int(unet.config.projection_class_embeddings_input_dim) - 6 * time_dim
            if pooled_dim <= 0:
                raise ValueError("this text_time UNet does not take SDXL's 6 time ids (a refiner?): not supported")
        targets = tuple(str(t) for t in target_modules)
        check_target_modules((n for n, _ in unet.named_modules()), targets)
        dim = int(unet.config.cross_attention_dim)
        self.config = FrozenDict(
            conditioning=conditioning, num_tasks=int(num_tasks), text_mode=text_mode, rank=int(rank),
            alpha=float(alpha if alpha is not None else rank), target_modules=list(targets), timestep=int(timestep),
            num_task_tokens=int(num_task_tokens), cross_attention_dim=dim, dropout=float(dropout),
            added_conditioning=added, pooled_dim=pooled_dim, addition_time_embed_dim=time_dim,
            addition_embed_type_num_heads=int(unet.config.addition_embed_type_num_heads) if added == "text" else None,
            downsample_factor=int(downsample_factor))
        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=int(rank), lora_alpha=self.config.alpha, lora_dropout=float(dropout),
                                           init_lora_weights="gaussian", target_modules=list(targets)), unet)
        unet.conv_out = GeneratorConvOut(unet.conv_out)
        self.unet = unet
        if conditioning == "task_id":
            self.task_tokens = nn.Embedding(int(num_tasks), int(num_task_tokens) * dim)
            nn.init.normal_(self.task_tokens.weight, std=0.02)
            if added == "text_time":
                self.task_pooled = nn.Embedding(int(num_tasks), pooled_dim)
                nn.init.normal_(self.task_pooled.weight, std=0.02)
        else:
            self.segment = nn.Parameter(torch.zeros(2, dim))
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_trainable(name))
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self._set_adapters(False)
        self._register_state_dict_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(self._checkpoint_with_adapters)

    @staticmethod
    def _is_trainable(name: str) -> bool:
        return ".lora_" in name or ".conv_out.twin." in name or name.startswith(("task_tokens.", "task_pooled.",
                                                                                 "segment"))

    # ------------------------------------------------------------------ adapter switch
    def _set_adapters(self, on: bool) -> None:
        # PEFT's own enable_adapters() also flips requires_grad of the adapter weights, which would hide them from
        # the optimizer and from DDP; only the forward switch is wanted here.
        if getattr(self, "_layers", None) is None:
            self._layers = _tuner_layers(self.unet)  # a plain list (not registered as submodules)
        for layer in self._layers:
            layer._disable_adapters = not on
        self.unet.conv_out.active = on

    @contextlib.contextmanager
    def adapters_enabled(self):
        """Generator mode for the duration (the default is teacher mode: adapters off); nests (a checkpointed
        block inside the generator's forward leaves them on)."""
        before = self.unet.conv_out.active
        if not before:
            self._set_adapters(True)
        try:
            yield
        finally:
            if not before:
                self._set_adapters(False)

    def _checkpoint_with_adapters(self, module, *args):
        """diffusers' gradient-checkpointing function, with the adapters on in the backward recomputation too
        (the block is recomputed after the generator's forward has switched them off)."""

        def run(*a):
            with self.adapters_enabled():
                return module(*a)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    # ------------------------------------------------------------------ weights
    @property
    def frozen_parameter_names(self) -> list[str]:
        """The teacher's weights (not trained, not saved, not synchronised by DDP)."""
        return [n for n, _ in self.named_parameters() if n not in self._trainable]

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n in self._trainable]

    def keep_trainable_fp32_(self) -> LoRATeacherGenerator:
        """After the shared UNet was cast to half precision (the teacher's dtype), put the trainable tensors back
        in float32 (same Parameter objects, so the optimizer keeps them)."""
        for _, p in self.trainable_named_parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    @torch.no_grad()
    def init_from_tasks_(self, task_table) -> LoRATeacherGenerator:
        """Task tokens := each task's (first) target-prompt embedding, when its length is ``num_task_tokens`` (and,
        SDXL, the task's pooled embedding := the target prompt's)."""
        from ddstrans.embeddings import PromptEmbeddings, hidden_states

        if self.config.conditioning != "task_id":
            return self
        emb = task_table.target
        first = emb[:, 0] if hidden_states(emb).ndim == 4 else emb
        tgt = hidden_states(first)
        if tgt.shape[0] == self.config.num_tasks and tgt.shape[1] == self.config.num_task_tokens:
            self.task_tokens.weight.copy_(tgt.reshape(tgt.shape[0], -1).to(self.task_tokens.weight))
        pooled = first.pooled if isinstance(first, PromptEmbeddings) else None
        if hasattr(self, "task_pooled") and pooled is not None and pooled.shape == self.task_pooled.weight.shape:
            self.task_pooled.weight.copy_(pooled.to(self.task_pooled.weight))
        return self

    # ------------------------------------------------------------------ forward
    def context(self, batch_size: int, task_ids=None, src_emb=None, tgt_emb=None) -> torch.Tensor:
        from ddstrans.generator import conditioning_tokens

        return conditioning_tokens(self, batch_size, None, task_ids, src_emb, tgt_emb)

    def forward(self, z: torch.Tensor, task_ids=None, src_emb=None, tgt_emb=None) -> torch.Tensor:
        from ddstrans.generator import added_conditioning

        b = z.shape[0]
        base_dtype = self.unet.conv_in.weight.dtype
        ctx = self.context(b, task_ids, src_emb, tgt_emb).to(base_dtype)
        t = torch.full((b,), self.config.timestep, device=z.device, dtype=torch.long)
        added = added_conditioning(self, z, task_ids, tgt_emb, base_dtype)
        with self.adapters_enabled():
            residual = self.unet(z.to(base_dtype), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        return z + residual.to(z.dtype)


def _drop_frozen(module: LoRATeacherGenerator, state_dict, prefix, local_metadata):
    for name in list(state_dict):
        if name.startswith(prefix) and name[len(prefix):] not in module._trainable:
            del state_dict[name]
    return state_dict


def _ignore_missing_frozen(module: LoRATeacherGenerator, incompatible_keys) -> None:
    """A state_dict of trainable tensors loads with ``strict=True``: the teacher's weights are not expected in it."""
    frozen = set(module.frozen_parameter_names)
    missing = incompatible_keys.missing_keys

    def is_frozen(key: str) -> bool:  # the key carries the parent modules' prefix: try every dotted suffix
        return key in frozen or any(key[i + 1:] in frozen for i, c in enumerate(key) if c == ".")

    missing[:] = [k for k in missing if not is_frozen(k)]


def build_lora_generator(*, teacher=None, num_tasks: int = 1, conditioning: str = "task_id", rank: int = DEFAULT_RANK,
                         alpha: float | None = DEFAULT_ALPHA, target_modules=DEFAULT_TARGET_MODULES,
                         timestep: int = 0, text_mode: str = "target", dropout: float = 0.0,
                         gradient_checkpointing: bool = False, num_task_tokens: int | None = None):
    """Hydra factory (``_partial_: true``; the LightningModule supplies ``teacher`` and ``num_tasks``).

    ``num_task_tokens`` defaults to the teacher's prompt length, so task tokens start as target prompts."""
    if teacher is None:
        raise ValueError("the LoRA generator needs the teacher (it adapts the teacher's own UNet)")
    if num_task_tokens is None:
        tok = getattr(teacher, "tokenizer", None) or getattr(getattr(teacher, "pipe", None), "tokenizer", None)
        num_task_tokens = int(getattr(tok, "model_max_length", 77))
    return LoRATeacherGenerator(teacher.unet, conditioning=conditioning, num_tasks=num_tasks, text_mode=text_mode,
                                rank=rank, alpha=alpha, target_modules=tuple(target_modules), timestep=timestep,
                                num_task_tokens=num_task_tokens, dropout=dropout,
                                gradient_checkpointing=gradient_checkpointing,
                                downsample_factor=int(getattr(teacher, "downsample_factor", 8)))


@torch.no_grad()
def merged_unet_state_dict(gen: LoRATeacherGenerator, in_place: bool = False) -> dict[str, torch.Tensor]:
    """The UNet's weights with every adapter folded in (``W + scale * B @ A``, float32) and the trained
    ``conv_out`` twin as ``conv_out``: a plain ``UNet2DConditionModel`` state_dict.

    ``in_place=True`` folds the adapters into the shared weights themselves and returns them without a copy (one
    copy of the UNet in memory: for export, after which ``gen`` and its teacher must not be used)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in gen.unet.named_modules()
              if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_A", {})]
    if in_place:
        for _, layer in layers:
            layer.base_layer.weight.data = layer.base_layer.weight.data.float()
            layer.merge(adapter_names=["default"])
    out = {}
    for k, v in gen.unet.state_dict().items():
        if ".lora_" in k or k.startswith("conv_out.base."):
            continue
        out[k.replace(".base_layer.", ".").replace("conv_out.twin.", "conv_out.")] = (
            v.detach().float() if in_place else v.detach().float().clone())
    if not in_place:
        for name, layer in layers:
            out[f"{name}.weight"] += layer.get_delta_weight("default").float()
    return out


@torch.no_grad()
def merge_to_translation_unet(gen: LoRATeacherGenerator, in_place: bool = False):
    """A self-contained ``TranslationUNet`` computing what ``gen`` computes (to float tolerance), without PEFT and
    without the teacher: the teacher's architecture, the merged weights, the same fixed timestep and context.
    ``ValueError`` when the teacher's UNet uses options a ``TranslationUNet`` cannot express. ``in_place``: see
    :func:`merged_unet_state_dict` (the result then shares the UNet's storage)."""
    from ddstrans.generator import TranslationUNet

    c, t = gen.config, gen.unet.config
    with torch.device("meta"):  # no second copy of the weights: they are assigned below
        tu = TranslationUNet(
        in_channels=t.in_channels, sample_size=t.sample_size, conditioning=c.conditioning,
        num_tasks=c.num_tasks if c.conditioning == "task_id" else 1, num_task_tokens=c.num_task_tokens,
        text_mode=c.text_mode if c.conditioning == "text" else "concat", cross_attention_dim=c.cross_attention_dim,
        block_out_channels=tuple(t.block_out_channels), layers_per_block=t.layers_per_block,
        down_block_types=tuple(t.down_block_types), up_block_types=tuple(t.up_block_types),
        mid_block_type=t.mid_block_type,
        attention_head_dim=tuple(t.attention_head_dim) if isinstance(t.attention_head_dim, (list, tuple))
        else t.attention_head_dim,
        norm_num_groups=t.norm_num_groups, text_pooling=False, timestep=c.timestep,
        transformer_layers_per_block=tuple(t.transformer_layers_per_block)
        if isinstance(t.transformer_layers_per_block, (list, tuple)) else t.transformer_layers_per_block,
        use_linear_projection=bool(t.use_linear_projection), added_conditioning=c.get("added_conditioning"),
        pooled_dim=c.get("pooled_dim") or 1280, addition_time_embed_dim=c.get("addition_time_embed_dim") or 256,
        addition_embed_type_num_heads=c.get("addition_embed_type_num_heads"),
        downsample_factor=c.get("downsample_factor") or 8)
    if t.out_channels != t.in_channels:
        raise ValueError(f"cannot merge: the teacher UNet has {t.out_channels} output and {t.in_channels} input "
                         "channels (a TranslationUNet maps latents to latents)")
    sd = merged_unet_state_dict(gen, in_place)
    try:
        res = tu.unet.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"cannot merge into a TranslationUNet (the teacher UNet's layout differs: "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    missing = [k for k in res.missing_keys if not k.startswith("class_embedding.")]
    if missing or res.unexpected_keys:
        raise ValueError(f"cannot merge into a TranslationUNet: missing {missing[:3]}, unexpected "
                         f"{res.unexpected_keys[:3]} (the teacher UNet's layout differs)")
    if c.conditioning == "task_id":
        tu.task_tokens.weight = nn.Parameter(gen.task_tokens.weight.detach().float().clone())
        if hasattr(gen, "task_pooled"):
            tu.task_pooled.weight = nn.Parameter(gen.task_pooled.weight.detach().float().clone())
        # the LoRA generator has no class embedding: a zero one adds nothing
        tu.unet.class_embedding.weight = nn.Parameter(torch.zeros(tu.unet.class_embedding.weight.shape))
    else:
        tu.segment = nn.Parameter(gen.segment.detach().float().clone())
    left = [n for n, p in tu.named_parameters() if p.is_meta] + [n for n, b in tu.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"cannot merge into a TranslationUNet: no weights for {left[:3]}")
    return tu.eval()


def lora_generator_from_config(unet, config: dict) -> LoRATeacherGenerator:
    """Rebuild a LoRA generator on ``unet`` from a checkpoint's ``generator_config``."""
    keys = ("conditioning", "num_tasks", "text_mode", "rank", "alpha", "target_modules", "timestep",
            "num_task_tokens", "dropout", "downsample_factor")
    return LoRATeacherGenerator(unet, **{k: config[k] for k in keys if k in config})
