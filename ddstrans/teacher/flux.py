"""Flux (dev and schnell): ``FluxTransformer2DModel`` on 16-channel latents read as 2x2 patches with position ids
(packing lives here: callers pass plain (B, 16, h, w) latents), CLIP pooled vector + T5 tokens.

Both released models are guidance-distilled: Flux-dev takes the guidance scale as an input embedding and has no
unconditional branch; Flux-schnell takes no guidance at all. DDS on them costs one conditional evaluation per branch
(2 per sample, in one batched call) instead of CFG's 4."""

from __future__ import annotations

import math

import torch

from ddstrans.embeddings import PromptEmbeddings
from ddstrans.teacher.flow_teacher import FlowTeacher
from ddstrans.teacher.latents import latent_position_ids, pack_2x2, unpack_2x2


class FluxTeacher(FlowTeacher):
    family = "flux"
    pipeline_class = "FluxPipeline"
    default_steps = 28
    default_guidance = 3.5

    def _init_family(self) -> None:
        self.transformer = self.pipe.transformer
        cfg = self.transformer.config
        self.guidance_mode = "embedded" if cfg.get("guidance_embeds", False) else "none"
        self._init_flow(int(cfg.in_channels) // 4, int(self.pipe.default_sample_size), int(cfg.joint_attention_dim))

    @property
    def image_multiple(self) -> int:
        return 2 * self.downsample_factor

    def timestep_shift(self, latent_hw) -> float:
        """Flux-dev's resolution-dependent shift (``use_dynamic_shifting``: ``exp(mu)`` of the packed sequence
        length, as the pipeline computes ``mu``); the static ``shift`` otherwise."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return super().timestep_shift(latent_hw)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return math.exp(mu)

    @staticmethod
    def encode_with(pipe, prompts, device, max_sequence_length=None):
        """The pipeline's ``encode_prompt``: T5 tokens and the CLIP pooled vector, ``{"hidden", "pooled"}``."""
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length)
        return {"hidden": hidden, "pooled": pooled}

    @torch.no_grad()
    def predict_velocity(self, z_t: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, guidance=None) -> torch.Tensor:
        """Velocity on plain latents; ``guidance``: the guidance-embedding input per sample (Flux-dev; ignored by
        models without guidance embedding)."""
        b, _, h, w = z_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width, got {(h, w)}")
        t = t.to(self.device).float().reshape(-1).expand(b)
        g = None
        if self.guidance_mode == "embedded":
            g = torch.as_tensor(self.default_guidance if guidance is None else guidance, dtype=torch.float32, device=self.device)
            g = g.reshape(-1).expand(b)
        hidden = emb.hidden.to(self.dtype)
        out = self.transformer(hidden_states=pack_2x2(z_t.to(self.dtype)), timestep=(t / 1000).to(self.dtype), guidance=g,
                               pooled_projections=emb.pooled.to(self.dtype), encoder_hidden_states=hidden,
                               txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
                               img_ids=latent_position_ids(h, w, self.device, self.dtype), return_dict=False)[0]
        return unpack_2x2(out.float(), h, w)

    def _pipeline_inputs(self, emb, uncond, latents):
        return {"prompt_embeds": emb.hidden, "pooled_prompt_embeds": emb.pooled, "latents": pack_2x2(latents),
                "max_sequence_length": self.max_sequence_length}

    def _from_pipeline_latents(self, out, h, w):
        return unpack_2x2(out, h, w)
