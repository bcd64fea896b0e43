"""The training losses built on a score: the surrogate whose gradient is the score, and the terms beside it.

``surrogate_loss`` turns a score gradient into a loss that autograd can back-propagate through the generator;
``identity_loss`` and ``palette_loss`` are optional terms of a run's ``loss`` config (``ddstrans.module.LOSS_TERMS``)
that hold what the edit does not call for. Plain functions, tested exactly.
"""

from __future__ import annotations

import torch


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
