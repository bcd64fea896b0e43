"""Images <-> latents and prompt -> tokens states, shared by the teacher and the exported translator.

VAE latents are ``(mean - shift_factor) * scaling_factor`` as diffusers' pipelines make them (SD 1.x/2.x and SDXL
have no shift; SD3 and Flux do). Flux's transformer reads 2x2 patches of them ("packed" latents) with position ids;
that packing lives here and inside the Flux teacher, so every generator sees plain ``(B, C, h, w)`` latents.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Stable Diffusion prompt encoding: pad to the tokenizer's max length, truncate, last hidden state."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor, scale: float, *, shift: float = 0.0, sample: bool = False,
               generator=None) -> torch.Tensor:
    """Images in [-1, 1] -> ``(latent - shift) * scale`` (float32); ``vae=None`` (pixel space) returns the images."""
    if vae is None:
        return images.float()
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return ((dist.sample(generator) if sample else dist.mean).float() - shift) * scale


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, scale: float, *, shift: float = 0.0) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32, clamped); ``vae=None`` returns the latents clamped."""
    if vae is None:
        return latents.float().clamp(-1, 1)
    z = latents / scale + shift
    return vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample.float().clamp(-1, 1)


def vae_scaling(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (1 and 0 without a VAE or the entry)."""
    if vae is None:
        return 1.0, 0.0
    return float(vae.config.get("scaling_factor", 1.0) or 1.0), float(vae.config.get("shift_factor", 0.0) or 0.0)


def pack_2x2(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): Flux's patch sequence (``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def unpack_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_2x2` for latents of size (h, w)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, h, w, 1)


def latent_position_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's image position ids of an (h, w) latent grid, (h/2 * w/2, 3)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
