"""The single-pass translation network: ``z_out = z_in + residual(z_in, condition)``.

The backbone is a diffusers ``UNet2DConditionModel`` run at a fixed timestep (0). The residual's last layer
(``conv_out``) is zero-initialised, so an untrained generator is exactly the identity.

Conditioning (``conditioning`` in the config):

- ``task_id``: a learned embedding per task, fed both as the UNet's class embedding (added to the time
  embedding: FiLM-like modulation of every ResNet block) and as ``num_task_tokens`` learned tokens seen by
  cross-attention.
- ``text``: the teacher's source and target prompt embeddings, concatenated along the token axis (with a
  learned segment embedding telling source from target tokens), through cross-attention, and (``text_pooling``)
  attention-pooled and added to the time embedding, so that every ResNet block is modulated by the prompts as
  task ids modulate it through the class embedding (``text_pooling=False``: cross-attention only). The exported
  model can then be asked for prompt pairs it never saw in training.
  ``text_mode="delta"`` feeds ``[tgt, tgt - src]``, ``text_mode="target"`` the target tokens alone (the merged
  LoRA generator's mode: the teacher's own input), ``text_mode="changed"`` ``[tgt, w * tgt]`` with ``w`` per token
  how much it differs from the source's (:func:`change_weights`): what to change, in the target's words, and
  nothing of the source's, which is in the image. A network keyed on the source's words (concat, delta) meets a
  new pair as a new input; one given only the target has to guess from the image whether a change is asked.

``timestep``: the fixed timestep the backbone runs at (0; a merged LoRA generator keeps the one it was trained at).

``added_conditioning="text_time"`` (a merged SDXL LoRA generator): the backbone keeps SDXL's added conditioning, a
pooled text embedding plus micro-conditioning time ids, because its weights were trained with it
(:func:`added_conditioning`).

Position features (``position_frequencies`` > 0): a convolutional UNet is (up to its padding) translation
equivariant, so it can only draw a texture whose phase is tied to the input's content. Some targets have no
such anchor: "checkered" admits every cell offset, the teacher's DDS direction points at a different one on
every step, and a network regressing on it averages them into flat gray. Fixed sin/cos features of the pixel
grid (:func:`grid_fourier_features`), concatenated to the input, give it the means to draw one absolute phase.
On the shapes world these features alone do not make it do so (docs/experiments/training-recipe.md); the option serves such experiments.

The class is a ``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` / ``from_pretrained`` work (safetensors).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from ddstrans.embeddings import PromptEmbeddings, hidden_states

CONDITIONINGS = ("task_id", "text")
TEXT_MODES = ("concat", "delta", "target", "changed")


def grid_fourier_features(height: int, width: int, frequencies: int) -> torch.Tensor:
    """``(4 * frequencies, H, W)``: sin and cos of ``2*pi*k*x/W`` and ``2*pi*k*y/H`` for ``k = 1..frequencies``.

    Integer ``k`` keeps every feature periodic on the image, so no edge of the grid is special.
    """
    if frequencies < 1:
        raise ValueError(f"frequencies must be >= 1, got {frequencies}")
    k = torch.arange(1, frequencies + 1, dtype=torch.float64)[:, None]
    ax = 2 * torch.pi * k * torch.arange(width, dtype=torch.float64)[None] / width  # (F, W)
    ay = 2 * torch.pi * k * torch.arange(height, dtype=torch.float64)[None] / height  # (F, H)
    fx = torch.cat([ax.sin(), ax.cos()])[:, None, :].expand(-1, height, -1)
    fy = torch.cat([ay.sin(), ay.cos()])[:, :, None].expand(-1, -1, width)
    return torch.cat([fx, fy]).float()


def change_weights(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """``(B, L, 1)`` in [0, 1]: per token, ``|tgt - src|`` over the sequence's largest; 0 where the prompts agree.

    A contextual (causal) text encoder also changes tokens after an edited word, so the weights mark a pattern per
    edited attribute rather than one word: with the shapes teacher, a color edit marks the color word, the
    shape word after it, "on" and the background word; a background edit marks the end of the prompt."""
    diff = (tgt - src).float().norm(dim=-1, keepdim=True)
    return (diff / diff.amax(dim=1, keepdim=True).clamp_min(1e-6)).to(tgt.dtype)


def conditioning_tokens(net, batch_size: int, dtype: torch.dtype | None, task_ids=None, src_emb=None, tgt_emb=None):
    """The cross-attention tokens of a generator with ``config`` (conditioning, text_mode, num_task_tokens,
    cross_attention_dim), ``task_tokens`` and ``segment``: learned tokens per task, or the teacher's prompt
    embeddings (target only, source then target, target and the target-source difference, or target and its changed
    tokens) marked by a learned
    segment embedding, in ``dtype`` (None: the segment embedding's). Shared by every generator kind so that one
    conditioning means one thing."""
    cfg = net.config
    if cfg.conditioning == "task_id":
        if task_ids is None:
            raise ValueError("task_id conditioning needs task_ids")
        return net.task_tokens(task_ids).reshape(batch_size, cfg.num_task_tokens, cfg.cross_attention_dim)
    if tgt_emb is None or (src_emb is None and cfg.text_mode != "target"):
        raise ValueError("text conditioning needs src_emb and tgt_emb (prompt embeddings of the teacher)")
    seg = net.segment if dtype is None else net.segment.to(dtype)
    dtype = seg.dtype
    if cfg.text_mode == "target":
        return hidden_states(tgt_emb).to(dtype) + seg[0]
    src, tgt = hidden_states(src_emb).to(dtype), hidden_states(tgt_emb).to(dtype)
    if cfg.text_mode == "delta":
        first, second = tgt, tgt - src
    elif cfg.text_mode == "changed":
        first, second = tgt, change_weights(src, tgt) * tgt
    else:
        first, second = src, tgt
    return torch.cat([first + seg[0], second + seg[1]], dim=1)


def added_conditioning(net, z: torch.Tensor, task_ids=None, tgt_emb=None, dtype: torch.dtype | None = None):
    """SDXL's ``added_cond_kwargs`` for a generator whose UNet has ``addition_embed_type="text_time"`` (``config``:
    ``added_conditioning``, ``conditioning``, ``downsample_factor``; ``task_pooled`` for task ids), else None.

    ``text_embeds``: the task's learned pooled embedding (initialised from its target prompt's), or the target
    prompt's pooled embedding (text conditioning). ``time_ids``: what the SDXL pipeline (and ``SDXLTeacher``) uses for
    this latent size without options: original size = target size = the image size, no crop. The SDXL UNet adds both
    to its time embedding; without them it cannot run, and with other values it is a different network than the
    one whose weights the generator adapts."""
    cfg = net.config
    if cfg.get("added_conditioning") != "text_time":  # "text" pools the context tokens inside the UNet
        return None
    if cfg.conditioning == "task_id":
        if task_ids is None:
            raise ValueError("task_id conditioning needs task_ids")
        pooled = net.task_pooled(task_ids)
    else:
        pooled = getattr(tgt_emb, "pooled", None) if isinstance(tgt_emb, PromptEmbeddings) else None
        if pooled is None:
            raise ValueError("an SDXL text-conditioned generator needs tgt_emb with a pooled embedding "
                             "(PromptEmbeddings of the SDXL teacher)")
    dtype = dtype or pooled.dtype
    f = int(cfg.get("downsample_factor") or 8)
    h, w = z.shape[-2] * f, z.shape[-1] * f
    ids = torch.tensor([[h, w, 0, 0, h, w]], device=z.device, dtype=dtype).expand(z.shape[0], -1)
    return {"text_embeds": pooled.to(device=z.device, dtype=dtype), "time_ids": ids}


class TranslationUNet(ModelMixin, ConfigMixin):
    """Latent (or pixel) in, latent out; identity at initialisation."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 64,
        conditioning: str = "task_id",
        num_tasks: int = 1,
        num_task_tokens: int = 1,
        text_mode: str = "concat",
        cross_attention_dim: int = 768,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        attention_head_dim: int | tuple[int, ...] = 8,
        norm_num_groups: int = 32,
        text_pooling: bool = True,
        position_frequencies: int = 0,
        timestep: int = 0,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        use_linear_projection: bool = False,
        added_conditioning: str | None = None,
        pooled_dim: int = 1280,
        addition_time_embed_dim: int = 256,
        addition_embed_type_num_heads: int | None = None,
        downsample_factor: int = 8,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        if conditioning == "task_id" and num_tasks < 1:
            raise ValueError("task_id conditioning needs num_tasks >= 1")
        if position_frequencies < 0:
            raise ValueError(f"position_frequencies must be >= 0, got {position_frequencies}")
        if added_conditioning not in (None, "text", "text_time"):
            raise ValueError(f"added_conditioning must be None, 'text' or 'text_time', got {added_conditioning!r}")
        if added_conditioning == "text_time" and conditioning == "text" and text_pooling:
            raise ValueError("added_conditioning='text_time' needs text_pooling=False (both feed the time embedding)")
        extra = {}
        if added_conditioning == "text_time":
            extra = dict(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                         projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim)
        elif added_conditioning == "text" or (conditioning == "text" and text_pooling):
            # a pooled-text time embedding read from the context tokens themselves: no extra inputs
            extra = dict(addition_embed_type="text", addition_embed_type_num_heads=addition_embed_type_num_heads
                         or next(h for h in (8, 4, 2, 1) if cross_attention_dim % h == 0))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels + 4 * position_frequencies,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            mid_block_type=mid_block_type,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=tuple(attention_head_dim) if isinstance(attention_head_dim, list) else attention_head_dim,
            norm_num_groups=norm_num_groups,
            transformer_layers_per_block=(tuple(transformer_layers_per_block)
                                          if isinstance(transformer_layers_per_block, list) else transformer_layers_per_block),
            use_linear_projection=use_linear_projection,
            num_class_embeds=num_tasks if conditioning == "task_id" else None,
            **extra,
        )
        if conditioning == "task_id":
            self.task_tokens = nn.Embedding(num_tasks, num_task_tokens * cross_attention_dim)
            nn.init.normal_(self.task_tokens.weight, std=0.02)
            if added_conditioning == "text_time":
                self.task_pooled = nn.Embedding(num_tasks, pooled_dim)
                nn.init.normal_(self.task_pooled.weight, std=0.02)
        else:
            self.segment = nn.Parameter(torch.randn(2, cross_attention_dim) * 0.02)
        self.zero_residual_()

    # ------------------------------------------------------------------ init
    def zero_residual_(self) -> TranslationUNet:
        """Zero the last layer: the generator becomes the identity."""
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        return self

    def load_teacher_weights_(self, teacher_unet: nn.Module) -> dict:
        """Copy every teacher UNet tensor whose name and shape match; re-zero the residual's last layer.

        Returns ``{"copied": n, "skipped": [names]}``.
        """
        own = self.unet.state_dict()
        copied, skipped = {}, []
        for k, v in teacher_unet.state_dict().items():
            if k in own and own[k].shape == v.shape:
                copied[k] = v.to(own[k].dtype)
            else:
                skipped.append(k)
        self.unet.load_state_dict(copied, strict=False)
        self.zero_residual_()
        return {"copied": len(copied), "skipped": skipped}

    # ------------------------------------------------------------------ forward
    def context(
        self,
        batch_size: int,
        task_ids: torch.Tensor | None = None,
        src_emb: torch.Tensor | None = None,
        tgt_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cross-attention tokens for this conditioning mode, (B, L, D)."""
        return conditioning_tokens(self, batch_size, self.unet.conv_in.weight.dtype, task_ids, src_emb, tgt_emb)

    def forward(
        self,
        z: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        src_emb: torch.Tensor | None = None,
        tgt_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = z.shape[0]
        ctx = self.context(b, task_ids, src_emb, tgt_emb)
        t = torch.full((b,), self.config.get("timestep", 0), device=z.device, dtype=torch.long)
        class_labels = task_ids if self.config.conditioning == "task_id" else None
        x = z.to(self.unet.conv_in.weight.dtype)
        if self.config.position_frequencies:
            pos = grid_fourier_features(z.shape[-2], z.shape[-1], self.config.position_frequencies)
            x = torch.cat([x, pos.to(x)[None].expand(b, -1, -1, -1)], dim=1)
        added = added_conditioning(self, z, task_ids, tgt_emb, x.dtype)
        residual = self.unet(x, t, encoder_hidden_states=ctx, class_labels=class_labels, added_cond_kwargs=added).sample
        return z + residual.to(z.dtype)


def build_generator(
    *,
    teacher=None,
    num_tasks: int = 1,
    conditioning: str = "task_id",
    init_from_teacher: bool = False,
    gradient_checkpointing: bool = False,
    copy_teacher_architecture: bool = False,
    **kwargs,
) -> TranslationUNet:
    """Build a generator matched to a teacher (latent channels: 4 or 16; cross-attention width: the width of the
    teacher's prompt tokens; sample size).

    ``copy_teacher_architecture=True`` takes the teacher UNet's block layout (SD-scale generator);
    ``init_from_teacher=True`` then copies its weights wherever names and shapes match. Both need a UNet teacher
    (SD 1.x/2.x, SDXL); transformer teachers (SD3, Flux) train a UNet generator of its own layout.
    Hydra configs call this with ``_partial_: true``; the LightningModule supplies ``teacher`` and ``num_tasks``.
    """
    unet = getattr(teacher, "unet", None)
    if (copy_teacher_architecture or init_from_teacher) and teacher is not None and unet is None:
        raise ValueError(f"init_from_teacher / copy_teacher_architecture need a UNet teacher (SD 1.x/2.x, SDXL); this "
                         f"teacher ({getattr(teacher, 'family', '?')}) is a transformer: use a UNet generator of its own "
                         "layout (e.g. generator=small)")
    if teacher is not None:
        kwargs.setdefault("in_channels", teacher.latent_channels)
        kwargs.setdefault("sample_size", teacher.latent_size)
        kwargs["cross_attention_dim"] = teacher.context_dim
        if copy_teacher_architecture or init_from_teacher:
            tcfg = unet.config
            for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                        "mid_block_type", "attention_head_dim", "norm_num_groups", "transformer_layers_per_block",
                        "use_linear_projection"):
                kwargs[key] = tcfg[key]
    # Hydra passes ListConfig: make every sequence a plain tuple (the config must stay JSON-serialisable)
    kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v)
              for k, v in kwargs.items()}
    gen = TranslationUNet(conditioning=conditioning, num_tasks=num_tasks, **kwargs)
    if init_from_teacher:
        if teacher is None:
            raise ValueError("init_from_teacher needs the teacher")
        gen.load_teacher_weights_(unet)
    if gradient_checkpointing:
        gen.enable_gradient_checkpointing()
    return gen
