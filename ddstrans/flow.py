"""Rectified-flow math (SD3, Flux) in the diffusers convention, as plain functions.

- noising ``x_sigma = (1 - sigma) x0 + sigma eps``, ``sigma = t / num_train_timesteps`` (``t`` in scheduler units,
  the shift of the sampling schedule already inside ``t``);
- the model predicts the velocity ``v = eps - x0``;
- the epsilon estimate of a velocity estimate is ``eps_hat = x_sigma + (1 - sigma) v_hat`` and the clean-image
  estimate ``x0_hat = x_sigma - sigma v_hat``.

Why epsilon space: DDS of two branches with the same ``eps`` and ``sigma`` then reads

    eps_hat_tgt - eps_hat_src = (1 - sigma) / sigma * [(z_tgt - z_src) - (x0_hat_tgt - x0_hat_src)]

(substitute ``v_hat = (x_sigma - x0_hat) / sigma``): the pull towards the target model's clean image, minus the
source branch's, as for an epsilon-prediction teacher. So ``dds_grad = w (eps_hat_tgt - eps_hat_src)`` has one
meaning, and one learning-rate scale, for every family. Classifier-free guidance is linear, so guiding ``v`` and
converting, or converting and guiding, give the same epsilon.

Timestep sampling: uniform or logit-normal sigma (SD3's training density, Esser et al., 2024), optionally shifted as
the scheduler's ``shift`` does (``sigma' = s sigma / (1 + (s - 1) sigma)``), restricted to a range given in
scheduler units.
"""

from __future__ import annotations

import math

import torch

SIGMA_SAMPLINGS = ("uniform", "logit_normal")


def _col(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


def sigma_of(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``sigma = t / num_train_timesteps`` (float32)."""
    return t.float() / float(num_train_timesteps)


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps``; ``sigma`` per sample (B,)."""
    s = _col(sigma.to(x0), x0.ndim)
    return (1 - s) * x0 + s * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target ``v = eps - x0``."""
    return noise - x0


def eps_from_velocity(v: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``eps_hat = x_sigma + (1 - sigma) v_hat``."""
    return x_sigma + (1 - _col(sigma.to(v), v.ndim)) * v


def x0_from_velocity(v: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x_sigma - sigma v_hat``."""
    return x_sigma - _col(sigma.to(v), v.ndim) * v


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedule shift of ``FlowMatchEulerDiscreteScheduler``: ``s sigma / (1 + (s - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def equivalent_alphas_cumprod(sigma: torch.Tensor) -> torch.Tensor:
    """The DDPM ``abar`` of the same signal-to-noise ratio, ``(1-sigma)^2 / ((1-sigma)^2 + sigma^2)``: lets the
    timestep weightings defined on ``abar`` (``sds``, ``snr_inverse``) apply to flow teachers."""
    a, b = (1 - sigma) ** 2, sigma**2
    return a / (a + b)


def sample_flow_timesteps(
    batch_size: int,
    t_range: tuple[float, float],
    *,
    num_train_timesteps: int = 1000,
    sampling: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Float timesteps (scheduler units) in ``[t_min, t_max)``: ``sigma = shift(u)`` with ``u`` uniform or
    logit-normal, restricted to the range by drawing ``u`` between the un-shifted range ends (inverse CDF of the
    logit-normal; no rejection, so the count of random numbers drawn is fixed)."""
    if sampling not in SIGMA_SAMPLINGS:
        raise ValueError(f"sigma sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}")
    n = float(num_train_timesteps)
    t_min, t_max = float(t_range[0]), float(t_range[1])
    if not 0 <= t_min < t_max <= n:
        raise ValueError(f"timestep range must satisfy 0 <= t_min < t_max <= {n:g}, got {tuple(t_range)}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    lo = unshift_sigma(torch.tensor(t_min / n, dtype=torch.float64), shift)
    hi = unshift_sigma(torch.tensor(t_max / n, dtype=torch.float64), shift)
    r = torch.rand(batch_size, generator=generator, device="cpu" if generator is None else generator.device).double()
    if sampling == "uniform":
        u = lo + (hi - lo) * r.to(lo.device)
    else:
        normal = torch.distributions.Normal(float(logit_mean), float(logit_std))

        def cdf(s):
            s = s.clamp(1e-12, 1 - 1e-12)
            return normal.cdf(torch.log(s / (1 - s)))

        p = cdf(lo) + (cdf(hi) - cdf(lo)) * r.to(lo.device)
        u = torch.sigmoid(normal.icdf(p.clamp(1e-12, 1 - 1e-12)))
    t = (shift_sigma(u, shift) * n).clamp(t_min, math.nextafter(t_max, t_min)).float()
    return t.to(device) if device is not None else t
