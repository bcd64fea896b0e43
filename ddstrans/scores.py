"""Score-distillation math: timesteps, noising, guidance, SDS and DDS gradients.

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

WEIGHTINGS = ("uniform", "sds", "snr_inverse")
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


def guidance_for_timesteps(t: torch.Tensor, scale, low_t: int = 0, low_scale: float = 1.0):
    """Guidance per sample: ``low_scale`` where ``t < low_t``, ``scale`` elsewhere (``scale`` unchanged when
    ``low_t`` is 0).

    Why: at low noise the image already fixes what the prompt decides, and guidance mostly amplifies the
    teacher's errors: under the shipped shapes teacher a perfect recolouring drifts under DDS at small t, less at
    lower guidance (``python -m ddstrans.shapes.eval_teacher --methods dds_from_target`` measures the drift).
    A guidance interval, as for sampling (Kynkaanniemi et al., 2024).
    """
    if low_t <= 0:
        return scale
    full = torch.as_tensor(scale, dtype=torch.float32, device=t.device).expand(t.shape)
    return torch.where(t < int(low_t), torch.full_like(full, float(low_scale)), full)


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


def zero_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN/Inf entries by 0 and count them (count stays a tensor: no host sync)."""
    finite = torch.isfinite(grad)
    return torch.where(finite, grad, torch.zeros_like(grad)), (~finite).sum()


def surrogate_loss(z: torch.Tensor, grad: torch.Tensor, reduction: str = "hw") -> torch.Tensor:
    """Loss whose autograd gradient w.r.t. ``z`` is the score gradient.

    ``reduction="hw"`` is the reference's ``(z * grad).sum() / (H * W)`` (gradient = grad / (H*W));
    ``"sum"`` gives exactly ``grad``; ``"mean"`` divides by the number of elements.
    """
    return _reduce((z * grad.detach()).sum(), z, reduction)


def _reduce(total: torch.Tensor, z: torch.Tensor, reduction: str) -> torch.Tensor:
    """``hw``: total / (H*W) (the reference); ``sum``: total; ``mean``: total / numel."""
    if reduction == "hw":
        return total / (z.shape[-1] * z.shape[-2])
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / z.numel()
    raise ValueError(f"unknown reduction {reduction!r}; choose hw, sum or mean")


def edit_mask(grad: torch.Tensor) -> torch.Tensor:
    """Where the score does *not* ask for change: ``1 - |grad| / max |grad|`` per sample (channel mean), in [0, 1].

    Near 0 where the prompt edit pulls hardest, near 1 where the score is flat (regions that should stay).
    """
    mag = grad.detach().abs().mean(dim=1, keepdim=True)
    peak = mag.flatten(1).amax(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return 1 - mag / peak


def identity_loss(
    z_tgt: torch.Tensor,
    z_src: torch.Tensor,
    grad: torch.Tensor,
    reduction: str = "hw",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Structure-preserving term beyond the DDS paper: squared change of the edited latent, weighted by
    :func:`edit_mask` of the score, so only regions the edit does not call for are held to the source.
    Reduced like :func:`surrogate_loss` (``hw``: sum / (H*W)); ``weight``: one factor per sample (e.g. 0/1 by task)."""
    held = edit_mask(grad) * (z_tgt - z_src.detach()).pow(2)
    if weight is None:  # one plain sum: the same floats as the unweighted loss
        return _reduce(held.sum(), z_tgt, reduction)
    return _reduce((held.flatten(1).sum(1) * weight.to(held)).sum(), z_tgt, reduction)


def palette_loss(z_tgt: torch.Tensor, z_src: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Beyond the DDS paper: squared 1-D Wasserstein distance between each sample's per-channel value
    distributions (mean squared difference of the sorted values), summed over channels and samples (``weight``:
    one factor per sample, e.g. 0/1 by task).

    Why: where a prompt redraws a whole region ("checkered" behind the shape) DDS leaves its levels free, and a
    network trained on it settles on one pair of levels for every input. Sorting forgets *where* each value is, so
    the term keeps the input's palette (levels and their proportions) while any rearrangement of them — stripes into
    checkers — is free; a per-channel mean and std keep less of it. Not divided by H*W: the gradient per pixel is
    already ``O(1 / (H*W))``, the scale of :func:`surrogate_loss`'s."""
    src = z_src.detach().flatten(2).sort(dim=-1).values
    tgt = z_tgt.flatten(2).sort(dim=-1).values
    per = (tgt - src).pow(2).mean(-1).sum(-1)
    return (per if weight is None else per * weight.to(per)).sum()


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


def is_flow(denoiser) -> bool:
    """A rectified-flow teacher (SD3, Flux): velocity output, ``x_sigma = (1 - sigma) x0 + sigma eps``."""
    return getattr(denoiser, "prediction_type", None) == "flow"


def _prepare(denoiser: Denoiser, z: torch.Tensor, t, noise, t_range, generator, sigma_sampling=None):
    flow = is_flow(denoiser)
    if t is None:
        if t_range is None:
            raise ValueError("t_range is required when t is not given")
        if flow:
            t = denoiser.sample_timesteps(z.shape[0], t_range, latent_hw=tuple(z.shape[-2:]), device=z.device,
                                          generator=generator, sampling=sigma_sampling)
        else:
            t = sample_timesteps(z.shape[0], t_range, device=z.device, generator=generator)
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
    space: str = "eps",
    sigma_sampling: str | None = None,
):
    """Score Distillation Sampling gradient ``w(t) (eps_hat(z_t, t, y) - eps)`` (float32, detached).

    Samples with ``t < guidance_low_t`` use guidance ``guidance_low`` (:func:`guidance_for_timesteps`). Flow
    teachers: ``eps_hat = x_sigma + (1 - sigma) v_hat``; ``space="velocity"`` returns ``w (v_hat - (eps - z))``.
    ``sigma_sampling`` (flow teachers, ``t=None``): ``uniform`` or ``logit_normal`` instead of the teacher's."""
    _check_space(denoiser, space)
    t, noise = _prepare(denoiser, z, t, noise, t_range, generator, sigma_sampling)
    z_t = _noised(denoiser, z, noise, t)
    scale = guidance_for_timesteps(t, guidance_scale, guidance_low_t, guidance_low)
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
    space: str = "eps",
    sigma_sampling: str | None = None,
):
    """Delta Denoising Score gradient ``w(t) (eps_hat(z_t, y_tgt) - eps_hat(zhat_t, y_src))``.

    Both branches share ``t`` and ``noise``; the four evaluations (uncond/cond x source/target) run as one batched
    call (two for guidance-distilled teachers: Flux). ``source_guidance_scale`` defaults to ``guidance_scale`` (as the
    reference). Without ``t``, timesteps are drawn from ``t_range``.
    Samples with ``t < guidance_low_t`` use guidance ``guidance_low`` in both branches
    (:func:`guidance_for_timesteps`; 0, the default, leaves the scales as given).

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
    src_scale = guidance_for_timesteps(t, src_scale, guidance_low_t, guidance_low)
    tgt_scale = guidance_for_timesteps(t, guidance_scale, guidance_low_t, guidance_low)
    branches = [(zs_t, emb_src, src_scale), (zt_t, emb_tgt, tgt_scale)]
    if space == "velocity":
        out_src, out_tgt = guided_predictions(denoiser, branches, t)
    else:
        out_src, out_tgt = guided_noise_predictions(denoiser, branches, t)
    return _finish(out_tgt - out_src, _weight(denoiser, t, weighting), t, noise, return_info)
