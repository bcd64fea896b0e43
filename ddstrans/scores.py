"""Score-distillation gradients: SDS and DDS against a denoiser (epsilon, v or flow teachers).

The primitives they are built from (timesteps, noising, guidance, weighting, noise policy) live in
``ddstrans.noising`` and the losses on a score in ``ddstrans.losses``; their names stay importable from here.
Plain functions so every formula can be tested exactly. The only outside object is a *denoiser*:
anything with ``alphas_cumprod`` (a 1-D tensor), ``uncond_embedding`` and ``predict_noise(z_t, t, emb) -> eps`` —
``ddstrans.Teacher`` is one; tests use the raw diffusers UNet through it. Flow teachers (SD3, Flux) say
``prediction_type == "flow"`` and give ``predict_velocity(z_t, t, emb, guidance=None)``, ``num_train_timesteps``
and ``sample_timesteps``; guidance-distilled ones (Flux) say ``guidance_mode`` ``embedded`` or ``none``.

Conventions (as the DDS reference notebook):
- ``z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps`` (flow: ``(1 - sigma) z + sigma eps``, ``ddstrans.flow``)
- guided prediction ``eps_u + s * (eps_c - eps_u)`` (flow: on the velocity, then ``eps = x_sigma + (1 - sigma) v``)
- SDS gradient ``w(t) * (eps_hat(z_t, y) - eps)``
- DDS gradient ``w(t) * (eps_hat(z_t, y_tgt) - eps_hat(zhat_t, y_src))`` with the *same* eps and t
  in both branches, so the noise term cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ddstrans import flow
from ddstrans.embeddings import expand_batch
from ddstrans.losses import edit_mask, identity_loss, palette_loss, surrogate_loss
from ddstrans.noising import (
    WEIGHTINGS,
    _per_sample,
    abar_at,
    add_noise,
    classifier_free_guidance,
    eps_from_sample,
    eps_from_v,
    fresh_noise,
    guidance_for_timesteps,
    mix_shared_noise,
    sample_timesteps,
    shared_noise,
    timestep_weight,
    velocity,
    weight_of_abar,
)

__all__ = [
    "SCORE_SPACES", "WEIGHTINGS", "Denoiser", "ScoreInfo", "abar_at", "add_noise", "classifier_free_guidance",
    "dds_grad", "draw_timesteps", "edit_mask", "eps_from_sample", "eps_from_v", "fresh_noise", "guidance_for_timesteps",
    "guided_noise_predictions", "guided_predictions", "identity_loss", "is_flow", "mix_shared_noise",
    "palette_loss", "sample_timesteps", "sds_grad", "shared_noise", "surrogate_loss", "timestep_weight",
    "velocity", "weight_of_abar", "zero_nonfinite",
]

SCORE_SPACES = ("eps", "velocity")


class Denoiser(Protocol):
    alphas_cumprod: torch.Tensor
    uncond_embedding: torch.Tensor

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, emb) -> torch.Tensor: ...


@dataclass
class ScoreInfo:
    """Diagnostics of one score evaluation (tensors, so reading them does not sync the device)."""

    nonfinite: torch.Tensor  # number of zeroed entries
    t: torch.Tensor
    noise: torch.Tensor


def zero_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN/Inf entries by 0 and count them (count stays a tensor: no host sync)."""
    finite = torch.isfinite(grad)
    return torch.where(finite, grad, torch.zeros_like(grad)), (~finite).sum()


def is_flow(denoiser) -> bool:
    """A rectified-flow teacher (SD3, Flux): velocity output, ``x_sigma = (1 - sigma) x0 + sigma eps``."""
    return getattr(denoiser, "prediction_type", None) == "flow"


def draw_timesteps(denoiser: Denoiser, z: torch.Tensor, t_range, generator=None, sigma_sampling=None) -> torch.Tensor:
    """One timestep per sample of ``z`` in ``t_range``, in the teacher's units: integers uniform in the range for
    DDPM-family teachers, the flow teacher's own sigma sampling (``sigma_sampling``, shift) for SD3 and Flux."""
    if is_flow(denoiser):
        return denoiser.sample_timesteps(z.shape[0], t_range, latent_hw=tuple(z.shape[-2:]), device=z.device,
                                         generator=generator, sampling=sigma_sampling)
    return sample_timesteps(z.shape[0], t_range, device=z.device, generator=generator)


def _prepare(denoiser: Denoiser, z: torch.Tensor, t, noise, t_range, generator, sigma_sampling=None):
    flow = is_flow(denoiser)
    if t is None:
        if t_range is None:
            raise ValueError("t_range is required when t is not given")
        t = draw_timesteps(denoiser, z, t_range, generator, sigma_sampling)
    t = torch.as_tensor(t, device=z.device)
    t = (t.float() if flow else t.long()).reshape(-1)
    if t.numel() == 1 and z.shape[0] > 1:
        t = t.expand(z.shape[0])
    if noise is None:
        noise = fresh_noise(z, generator)
    if noise.shape != z.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(z.shape)}")
    return t, noise


def _uncond(denoiser: Denoiser, emb):
    u = denoiser.uncond_embedding.to(device=emb.device, dtype=emb.dtype)
    return expand_batch(u, len(emb))


def _predict(denoiser, z_t, t, emb, guidance=None):
    """The denoiser's output in its convention: epsilon (DDPM-family teachers) or velocity (flow teachers)."""
    if is_flow(denoiser):
        return denoiser.predict_velocity(z_t, t, emb, guidance=guidance).float()
    return denoiser.predict_noise(z_t, t, emb).float()


def guided_predictions(denoiser: Denoiser, branches: list[tuple[torch.Tensor, object, object]], t: torch.Tensor):
    """Guided predictions for several ``(z_t, emb, guidance_scale)`` branches in **one** denoiser call, in the
    denoiser's convention (epsilon, or velocity for flow teachers: CFG is applied to ``v``).

    Classifier-free guidance (``guidance_mode`` ``cfg``, the default): the batch is [uncond_0, cond_0, uncond_1,
    cond_1, ...], every branch at the same ``t``. Guidance-distilled teachers (``embedded``: the scale is an input;
    ``none``: no guidance) have no unconditional branch: the batch is [cond_0, cond_1, ...].
    """
    b = branches[0][0].shape[0]
    mode = getattr(denoiser, "guidance_mode", "cfg")
    if mode == "cfg":
        z_in = torch.cat([zz for z, _, _ in branches for zz in (z, z)])
        e_in = torch.cat([ee for _, e, _ in branches for ee in (_uncond(denoiser, e), expand_batch(e, b))])
        out = _predict(denoiser, z_in, t.repeat(2 * len(branches)), e_in).split(b)
        return [classifier_free_guidance(out[2 * i], out[2 * i + 1], s) for i, (_, _, s) in enumerate(branches)]
    if mode not in ("embedded", "none"):
        raise ValueError(f"unknown guidance_mode {mode!r} of the denoiser")
    z_in = torch.cat([z for z, _, _ in branches])
    e_in = torch.cat([expand_batch(e, b) for _, e, _ in branches])
    g = None
    if mode == "embedded":
        g = torch.cat([torch.as_tensor(s, dtype=torch.float32, device=z_in.device).reshape(-1).expand(b)
                       for _, _, s in branches])
    return list(_predict(denoiser, z_in, t.repeat(len(branches)), e_in, guidance=g).split(b))


def guided_noise_predictions(denoiser: Denoiser, branches, t: torch.Tensor) -> list[torch.Tensor]:
    """Epsilon-space :func:`guided_predictions` (flow velocities converted with ``eps = x_sigma + (1 - sigma) v``)."""
    out = guided_predictions(denoiser, branches, t)
    if not is_flow(denoiser):
        return out
    sigma = flow.sigma_of(t, denoiser.num_train_timesteps)
    return [flow.eps_from_velocity(v, z.float(), sigma) for v, (z, _, _) in zip(out, branches)]


def _noised(denoiser, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if is_flow(denoiser):
        return flow.flow_add_noise(z.float(), noise.float(), flow.sigma_of(t, denoiser.num_train_timesteps))
    return add_noise(z.float(), noise.float(), t, denoiser.alphas_cumprod)


def _weight(denoiser, t: torch.Tensor, weighting: str) -> torch.Tensor:
    if is_flow(denoiser):  # the DDPM abar of the same signal-to-noise ratio
        return weight_of_abar(flow.equivalent_alphas_cumprod(flow.sigma_of(t, denoiser.num_train_timesteps)), weighting)
    return timestep_weight(t, denoiser.alphas_cumprod, weighting)


def _check_space(denoiser, space: str) -> None:
    if space not in SCORE_SPACES:
        raise ValueError(f"score space must be one of {SCORE_SPACES}, got {space!r}")
    if space == "velocity" and not is_flow(denoiser):
        raise ValueError("space='velocity' needs a flow teacher (SD3, Flux); this teacher predicts "
                         f"{getattr(denoiser, 'prediction_type', 'epsilon')}")


def _finish(grad, weight, info_t, noise, return_info):
    grad = grad * _per_sample(weight, grad.ndim)
    grad, nonfinite = zero_nonfinite(grad)
    if return_info:
        return grad, ScoreInfo(nonfinite=nonfinite, t=info_t, noise=noise)
    return grad


@torch.no_grad()
def sds_grad(
    denoiser: Denoiser,
    z: torch.Tensor,
    emb,
    *,
    t: torch.Tensor | int | None = None,
    noise: torch.Tensor | None = None,
    guidance_scale,
    weighting: str = "uniform",
    t_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    guidance_low_t: int = 0,
    guidance_low: float = 1.0,
    guidance_low_eligible: torch.Tensor | None = None,
    space: str = "eps",
    sigma_sampling: str | None = None,
):
    """Score Distillation Sampling gradient ``w(t) (eps_hat(z_t, t, y) - eps)`` (float32, detached).

    Samples with ``t < guidance_low_t`` use guidance ``guidance_low`` (:func:`guidance_for_timesteps`; only those
    flagged in ``guidance_low_eligible`` when given). Flow teachers: ``eps_hat = x_sigma + (1 - sigma) v_hat``;
    ``space="velocity"`` returns ``w (v_hat - (eps - z))``.
    ``sigma_sampling`` (flow teachers, ``t=None``): ``uniform`` or ``logit_normal`` instead of the teacher's."""
    _check_space(denoiser, space)
    t, noise = _prepare(denoiser, z, t, noise, t_range, generator, sigma_sampling)
    z_t = _noised(denoiser, z, noise, t)
    scale = guidance_for_timesteps(t, guidance_scale, guidance_low_t, guidance_low, guidance_low_eligible)
    if space == "velocity":
        (v_hat,) = guided_predictions(denoiser, [(z_t, emb, scale)], t)
        diff = v_hat - flow.flow_velocity(z.float(), noise.float())
    else:
        (eps_hat,) = guided_noise_predictions(denoiser, [(z_t, emb, scale)], t)
        diff = eps_hat - noise.float()
    return _finish(diff, _weight(denoiser, t, weighting), t, noise, return_info)


@torch.no_grad()
def dds_grad(
    denoiser: Denoiser,
    z_src: torch.Tensor,
    z_tgt: torch.Tensor,
    emb_src,
    emb_tgt,
    *,
    t: torch.Tensor | int | None = None,
    noise: torch.Tensor | None = None,
    guidance_scale,
    source_guidance_scale=None,
    weighting: str = "uniform",
    t_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    guidance_low_t: int = 0,
    guidance_low: float = 1.0,
    guidance_low_eligible: torch.Tensor | None = None,
    space: str = "eps",
    sigma_sampling: str | None = None,
):
    """Delta Denoising Score gradient ``w(t) (eps_hat(z_t, y_tgt) - eps_hat(zhat_t, y_src))``.

    Both branches share ``t`` and ``noise``; the four evaluations (uncond/cond x source/target) run as one batched
    call (two for guidance-distilled teachers: Flux). ``source_guidance_scale`` defaults to ``guidance_scale`` (as the
    reference). Without ``t``, timesteps are drawn from ``t_range``.
    Samples with ``t < guidance_low_t`` use guidance ``guidance_low`` in both branches
    (:func:`guidance_for_timesteps`; 0, the default, leaves the scales as given), only the samples flagged in
    ``guidance_low_eligible`` when it is given.

    Flow teachers (SD3, Flux): ``t`` in scheduler units, ``sigma = t / num_train_timesteps``; guidance acts on the
    velocity; the result is in epsilon space, ``(1 - sigma) / sigma * [(z_tgt - z_src) - (x0_hat_tgt - x0_hat_src)]``
    (``ddstrans.flow``), or with ``space="velocity"`` the velocity difference ``w (v_hat_tgt - v_hat_src)``.
    """
    if z_src.shape != z_tgt.shape:
        raise ValueError(f"z_src {tuple(z_src.shape)} and z_tgt {tuple(z_tgt.shape)} must have the same shape")
    _check_space(denoiser, space)
    t, noise = _prepare(denoiser, z_tgt, t, noise, t_range, generator, sigma_sampling)
    zs_t = _noised(denoiser, z_src, noise, t)
    zt_t = _noised(denoiser, z_tgt, noise, t)
    src_scale = guidance_scale if source_guidance_scale is None else source_guidance_scale
    src_scale = guidance_for_timesteps(t, src_scale, guidance_low_t, guidance_low, guidance_low_eligible)
    tgt_scale = guidance_for_timesteps(t, guidance_scale, guidance_low_t, guidance_low, guidance_low_eligible)
    branches = [(zs_t, emb_src, src_scale), (zt_t, emb_tgt, tgt_scale)]
    if space == "velocity":
        out_src, out_tgt = guided_predictions(denoiser, branches, t)
    else:
        out_src, out_tgt = guided_noise_predictions(denoiser, branches, t)
    return _finish(out_tgt - out_src, _weight(denoiser, t, weighting), t, noise, return_info)
