"""SDXL / SDXL-Turbo: two CLIP text encoders (hidden states concatenated, pooled output of the second),
micro-conditioning ``add_time_ids`` (original size, crop, target size) through ``addition_embed_type="text_time"``;
a DDPM-family UNet (epsilon; v-prediction where the scheduler says so)."""

from __future__ import annotations

import torch

from ddstrans.embeddings import PromptEmbeddings
from ddstrans.teacher.pipeline import PipelineTeacher
from ddstrans.teacher.sd import DDPMTeacherMixin


class SDXLTeacher(DDPMTeacherMixin, PipelineTeacher):
    """Prompt embeddings: ``hidden`` (B, 77, 2048) and ``pooled`` (B, 1280); the unconditional branch is zeros when
    the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL base), as the pipeline does without a negative
    prompt. The micro-conditioning is the pipeline's default for the latents' size: original = target = the image
    size, no crop."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    default_steps = 50
    default_guidance = 5.0

    def _init_family(self) -> None:
        self.unet = self.pipe.unet
        self._init_ddpm()
        self._time_ids: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def encode_with(pipe, prompts, device, max_sequence_length=None):
        """The pipeline's ``encode_prompt`` without negative prompt: ``{"hidden", "pooled"}``."""
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"hidden": hidden, "pooled": pooled}

    def _uncond_fields(self):
        _, hidden, _, pooled = self.pipe.encode_prompt([""], device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
        return {"hidden": hidden, "pooled": pooled}

    def time_ids(self, h: int, w: int) -> torch.Tensor:
        """``add_time_ids`` (1, 6) of the pipeline for latents of size (h, w)."""
        key = (h, w, self.device, self.dtype)
        if key not in self._time_ids:
            size = (h * self.downsample_factor, w * self.downsample_factor)
            te2 = self.pipe.text_encoder_2
            ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype,
                                              text_encoder_projection_dim=int(te2.config.projection_dim))
            self._time_ids[key] = ids.to(self.device)
        return self._time_ids[key]

    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings) -> torch.Tensor:
        """Epsilon prediction (v-prediction converted)."""
        ids = self.time_ids(*z_t.shape[-2:]).expand(z_t.shape[0], -1)
        cond = {"text_embeds": emb.pooled.to(self.dtype), "time_ids": ids}
        out = self.unet(self._unet_input(z_t), t, encoder_hidden_states=emb.hidden.to(self.dtype),
                        added_cond_kwargs=cond).sample.float()
        return self._to_eps(out, z_t, t)

    def _pipeline_inputs(self, emb, uncond, latents):
        return {"prompt_embeds": emb.hidden, "pooled_prompt_embeds": emb.pooled, "negative_prompt_embeds": uncond.hidden,
                "negative_pooled_prompt_embeds": uncond.pooled, "latents": latents}
