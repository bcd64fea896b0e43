"""SD3 / SD3.5: ``SD3Transformer2DModel`` on 16-channel latents (VAE ``shift_factor`` and ``scaling_factor``),
``FlowMatchEulerDiscreteScheduler`` (shift 3), two CLIP encoders and an optional T5 joined as the pipeline joins
them: CLIP hidden states concatenated and zero-padded to T5's width, then T5 tokens appended (zeros without T5);
pooled projections of both CLIPs concatenated."""

from __future__ import annotations

from pathlib import Path

import torch

from ddstrans.embeddings import PromptEmbeddings
from ddstrans.teacher.flow_teacher import FlowTeacher


class SD3Teacher(FlowTeacher):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_steps = 28
    default_guidance = 7.0

    def _init_family(self) -> None:
        self.transformer = self.pipe.transformer
        cfg = self.transformer.config
        self._init_flow(int(cfg.in_channels), int(cfg.sample_size), int(cfg.joint_attention_dim))

    @classmethod
    def _absent_components(cls, root: Path) -> dict:
        return {c: None for c in ("text_encoder_3", "tokenizer_3") if not (root / c).is_dir()}

    @staticmethod
    def encode_with(pipe, prompts, device, max_sequence_length=None):
        """The pipeline's ``encode_prompt`` without negative prompt: ``{"hidden", "pooled"}``."""
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"hidden": hidden, "pooled": pooled}

    def _uncond_fields(self):
        _, hidden, _, pooled = self.pipe.encode_prompt([""], None, None, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True,
                                                       max_sequence_length=self.max_sequence_length)
        return {"hidden": hidden, "pooled": pooled}

    @torch.no_grad()
    def predict_velocity(self, z_t: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, guidance=None) -> torch.Tensor:
        t = t.to(self.device).float().reshape(-1).expand(z_t.shape[0])
        out = self.transformer(hidden_states=z_t.to(self.dtype), timestep=t.to(self.dtype),
                               encoder_hidden_states=emb.hidden.to(self.dtype), pooled_projections=emb.pooled.to(self.dtype),
                               return_dict=False)[0]
        return out.float()

    def _pipeline_inputs(self, emb, uncond, latents):
        return {"prompt_embeds": emb.hidden, "pooled_prompt_embeds": emb.pooled, "negative_prompt_embeds": uncond.hidden,
                "negative_pooled_prompt_embeds": uncond.pooled, "latents": latents,
                "max_sequence_length": self.max_sequence_length}
