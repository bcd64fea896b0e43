"""Diffusion primitives of score distillation: timesteps, forward noising, prediction conversions, classifier-free
guidance, timestep weighting and the noise policy (fresh or shared noise).

Plain functions on tensors (no denoiser), so every formula can be tested exactly; ``ddstrans.scores`` builds the
SDS and DDS gradients from them. Conventions (as the DDS reference notebook):
``z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps``; guided prediction ``eps_u + s * (eps_c - eps_u)``.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("uniform", "sds", "snr_inverse")


def sample_timesteps(
    batch_size: int,
    t_range: tuple[int, int],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer timesteps uniform in ``[t_min, t_max)`` (the reference's range: ``ddstrans.guidance.Guidance``)."""
    t_min, t_max = int(t_range[0]), int(t_range[1])
    if not 0 <= t_min < t_max:
        raise ValueError(f"timestep range must satisfy 0 <= t_min < t_max, got {t_range}")
    t = torch.randint(t_min, t_max, (batch_size,), generator=generator, device="cpu" if generator is None else generator.device)
    return t.to(device) if device is not None else t


def _per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


def abar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``alphas_cumprod[t]`` shaped (B, 1, 1, ...) for broadcasting against a ``ndim`` tensor."""
    return _per_sample(alphas_cumprod.to(t.device)[t].float(), ndim)


def add_noise(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``."""
    abar = abar_at(alphas_cumprod, t, z.ndim)
    return abar.sqrt() * z + (1 - abar).sqrt() * noise


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    """``eps_u + s (eps_c - eps_u)``; ``scale`` may be a float or a per-sample tensor (B,)."""
    if torch.is_tensor(scale) and scale.ndim > 0:
        scale = _per_sample(scale.to(eps_cond), eps_cond.ndim)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guidance_for_timesteps(t: torch.Tensor, scale, low_t: int = 0, low_scale: float = 1.0,
                           eligible: torch.Tensor | None = None):
    """Guidance per sample: ``low_scale`` where ``t < low_t`` (and, given a boolean ``eligible`` per sample, only
    where it is True), ``scale`` elsewhere (``scale`` unchanged when ``low_t`` is 0).

    Why: at low noise the image already fixes what the prompt decides, and guidance mostly amplifies the
    teacher's errors: under the shipped shapes teacher a perfect recolouring drifts under DDS at small t, less at
    lower guidance (``python -m ddstrans.shapes.eval_teacher --methods dds_from_target`` measures the drift).
    A guidance interval, as for sampling (Kynkaanniemi et al., 2024).
    """
    if low_t <= 0:
        return scale
    full = torch.as_tensor(scale, dtype=torch.float32, device=t.device).expand(t.shape)
    low = t < int(low_t)
    if eligible is not None:
        low = low & eligible.to(device=t.device, dtype=torch.bool)
    return torch.where(low, torch.full_like(full, float(low_scale)), full)


def velocity(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z`` of :func:`add_noise`'s ``z_t``
    (Salimans & Ho, 2022): unlike epsilon, its error does not grow into the x0 estimate at high noise."""
    abar = abar_at(alphas_cumprod, t, z.ndim)
    return abar.sqrt() * noise - (1 - abar).sqrt() * z


def eps_from_v(v: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Epsilon from a v-prediction: ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t``."""
    abar = abar_at(alphas_cumprod, t, z_t.ndim)
    return abar.sqrt() * v + (1 - abar).sqrt() * z_t


def eps_from_sample(x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Epsilon from an x0-prediction: ``eps = (z_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
    abar = abar_at(alphas_cumprod, t, z_t.ndim)
    return (z_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def timestep_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """w(t) per sample: ``uniform`` = 1 (reference), ``sds`` = 1 - abar_t (DreamFusion),
    ``snr_inverse`` = sqrt((1 - abar_t) / abar_t)."""
    return weight_of_abar(alphas_cumprod.to(t.device)[t].float(), kind)


def weight_of_abar(abar: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """:func:`timestep_weight` from ``abar`` per sample (flow teachers: the equivalent ``abar`` of their sigma)."""
    if kind == "uniform":
        return torch.ones_like(abar)
    if kind == "sds":
        return 1 - abar
    if kind == "snr_inverse":
        return ((1 - abar) / abar).sqrt()
    raise ValueError(f"unknown weighting {kind!r}; choose one of {WEIGHTINGS}")


def fresh_noise(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise like ``z``, drawn on the generator's device (CPU without one) for reproducibility."""
    noise = torch.randn(z.shape, generator=generator, device="cpu" if generator is None else generator.device)
    return noise.to(device=z.device, dtype=z.dtype)


def shared_noise(shape: tuple[int, ...], seed: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """One noise tensor of one latent's ``shape`` (C, H, W), the same for a given ``seed`` on every rank and run."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)


def mix_shared_noise(
    noise: torch.Tensor,
    shared: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace each sample's ``noise`` by ``shared`` (broadcast over the batch) with probability ``prob``; with
    ``eligible`` (a boolean per sample) only eligible samples are replaced.

    Why: fresh noise per sample and step lets DDS pick any of several equally good targets when the prompt leaves
    a free choice (a checkerboard's phase): a deterministic network trained on those directions learns their
    average (flat gray). With the same noise everywhere the teacher's choice becomes a function of the input, which a
    network can learn."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"shared-noise probability must be in [0, 1], got {prob}")
    if shared.shape != noise.shape[1:]:
        raise ValueError(f"shared noise shape {tuple(shared.shape)} does not match one sample's {tuple(noise.shape[1:])}")
    if prob == 0.0:
        return noise
    if prob == 1.0:
        pick = torch.ones(noise.shape[0], dtype=torch.bool, device=noise.device)
    else:
        draw = torch.rand(noise.shape[0], generator=generator, device="cpu" if generator is None else generator.device)
        pick = (draw < prob).to(noise.device)
    if eligible is not None:  # kept on the noise's device: no host sync on a GPU
        pick = pick & eligible.to(noise.device, torch.bool).reshape(-1)
    pick = _per_sample(pick, noise.ndim)
    return torch.where(pick, shared.to(noise), noise)
