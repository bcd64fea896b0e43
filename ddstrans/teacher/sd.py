"""Stable Diffusion 1.x / 2.x (epsilon, v- or x0-prediction; SD-Turbo is one): one CLIP text encoder, a
``UNet2DConditionModel``, a DDPM-family scheduler, an optional VAE (pixel-space teachers have none)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddstrans.guidance import Guidance
from ddstrans.scores import classifier_free_guidance, eps_from_sample, eps_from_v
from ddstrans.teacher.base import LEGACY_KEY, TeacherBase, TeacherLoadError
from ddstrans.teacher.latents import encode_text

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_scheduler(scheduler, num_inference_steps: int, device=None, **overrides):
    """A DDIM scheduler with the training ``scheduler``'s config (``overrides``, e.g. ``timestep_spacing``, replace
    entries), set to ``num_inference_steps``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config, **overrides)
    sched.set_timesteps(num_inference_steps, device=device)
    return sched


@torch.no_grad()
def ddim_cfg_loop(unet, sched, z: torch.Tensor, emb: torch.Tensor, uncond: torch.Tensor,
                  guidance_scale: float | Callable[[int], float], *, eta: float | Callable[[int], float] = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``sched``'s timesteps from latents ``z`` (float32) with classifier-free guidance (one batched UNet call
    per step: unconditional and conditional); returns the final latents. ``guidance_scale`` may be a function of the
    timestep (guidance schedules). Shared by :meth:`Teacher.sample` and the shapes teacher's training probe, which
    samples with weights still in training. ``eta`` > 0 adds fresh noise at every step (DDIM's eta; 1 is DDPM's
    posterior variance), drawn from ``generator``: stochastic samplers can correct an earlier step's error; it may be
    a function of the timestep too (noise only where the layout is still open, say)."""
    for t in sched.timesteps:
        scale = guidance_scale(int(t)) if callable(guidance_scale) else guidance_scale
        step_eta = eta(int(t)) if callable(eta) else eta
        tt = t.reshape(1).expand(len(z)).to(z.device)
        eps = unet(torch.cat([z, z]).to(unet.dtype), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([uncond, emb])).sample.float()
        eps_u, eps_c = eps.chunk(2)
        # eta 0: DDIMScheduler.step draws no noise, so the generator is left untouched
        z = sched.step(classifier_free_guidance(eps_u, eps_c, scale), t, z, eta=step_eta, generator=generator).prev_sample
    return z


class DDPMTeacherMixin:
    """Epsilon from a UNet of any DDPM prediction type (shared by SD 1.x/2.x and SDXL)."""

    def _init_ddpm(self) -> None:
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise TeacherLoadError(f"unsupported prediction_type {self.prediction_type!r} in scheduler config")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float().to(self.unet.device)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.latent_channels = self.unet.config.in_channels
        self.latent_size = int(self.unet.config.sample_size)
        self.context_dim = int(self.unet.config.cross_attention_dim)

    def _moved(self, device) -> None:
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    def _unet_input(self, z_t: torch.Tensor) -> torch.Tensor:
        x = z_t.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def _to_eps(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return eps_from_v(out, z_t.float(), t, self.alphas_cumprod)
        if self.prediction_type == "sample":
            return eps_from_sample(out, z_t.float(), t, self.alphas_cumprod)
        return out


class Teacher(DDPMTeacherMixin, TeacherBase):
    """A frozen diffusion model that gives noise predictions, prompt embeddings and (de)coding.

    ``Teacher.from_pretrained`` reads the directory's ``model_index.json`` and returns the adapter of its family
    (this class for SD 1.x/2.x, :class:`~ddstrans.teacher.sdxl.SDXLTeacher`, ...; every one is a ``Teacher``).

    Attributes: ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``, ``vae`` (or None for pixel-space
    teachers), ``alphas_cumprod`` (float32), ``prediction_type``, ``latent_scale``, ``downsample_factor``.
    """

    family = "sd"

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, *, identity="teacher", cache_dir=None):
        self.unet, self.scheduler, self.text_encoder, self.tokenizer, self.vae = unet, scheduler, text_encoder, tokenizer, vae
        self.model = unet
        self._init_ddpm()
        self._setup(identity=identity, cache_dir=cache_dir)

    def text_modules(self):
        return [self.text_encoder]

    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, torch_dtype=None, device=None, cache_dir=None, variant=None):
        """Load and freeze a teacher of any supported family (see ``ddstrans.teacher.loading``). ``torch_dtype``
        (e.g. ``torch.float16`` on GPU) applies to all weights; ``variant="fp16"`` picks ``*.fp16.safetensors``
        files where a checkpoint ships them."""
        from ddstrans.teacher.loading import load_teacher

        return load_teacher(path_or_hub_id, torch_dtype=torch_dtype, device=device, cache_dir=cache_dir,
                            variant=variant, sd_class=cls)

    # ------------------------------------------------------------------ prompts
    def _encode_fields(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Stable Diffusion text encoding: pad to the tokenizer's max length, truncate, last hidden state."""
        return {LEGACY_KEY: encode_text(self.tokenizer, self.text_encoder, prompts)}

    # ------------------------------------------------------------------ denoising
    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction for noisy latents (v- and x0-prediction teachers converted to epsilon)."""
        out = self.unet(self._unet_input(z_t), t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        return self._to_eps(out, z_t, t)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float | Callable[[int], float] = Guidance.guidance,
        generator: torch.Generator | None = None,
        size: int | None = None,
        latents: torch.Tensor | None = None,
        timestep_spacing: str | None = None,
        eta: float | Callable[[int], float] = 0.0,
        clip_sample: bool | None = None,
    ) -> torch.Tensor:
        """Text-to-image with DDIM and classifier-free guidance; images in [-1, 1], (B, 3, H, W).
        ``guidance_scale`` may be a function of the timestep; ``timestep_spacing`` (e.g. ``"trailing"``) replaces
        the scheduler config's; ``eta`` > 0 samples stochastically (noise from ``generator``; it may be a function
        of the timestep, too); ``clip_sample`` replaces the config's clamping of each step's predicted clean image to
        [-1, 1]."""
        overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
        if clip_sample is not None:
            overrides["clip_sample"] = clip_sample
        sched = ddim_scheduler(self.scheduler, num_inference_steps, self.device, **overrides)
        size = size or self.image_size
        f = self.downsample_factor
        shape = (len(prompts), self.latent_channels, size // f, size // f)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        emb = self.encode_prompts(prompts)
        z = ddim_cfg_loop(self.unet, sched, latents.to(self.device).float(), emb, self.uncond_embedding.expand_as(emb),
                          guidance_scale, eta=eta, generator=generator)
        return self.decode_latents(z)
