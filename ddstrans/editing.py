"""Zero-shot editing: optimise one image's latent with DDS (or SDS) against the teacher.

Reference settings (the DDS authors' notebook): latent initialised to the source, SGD with lr 0.1 on
2000 x surrogate loss, 200 steps, and the score settings of ``ddstrans.guidance.Guidance``'s defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddstrans.embeddings import expand_batch
from ddstrans.guidance import Guidance
from ddstrans.scores import surrogate_loss

EDIT_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class EditConfig(Guidance):
    """The score settings (``Guidance``) plus the optimisation's. As in training, ``t_range_end`` moves the range
    over the edit (large t first for layout, small t last for detail; ``t_range_steps`` 0: over all ``steps``),
    and ``shared_noise_prob=1`` uses one noise for every image and step: it shows which choices the noise, not the
    input, decides. ``optimizer="adam"`` steps each pixel by its own normalised gradient, as a network's weights
    are trained, instead of the method's plain SGD: it shows whether the optimizer, not the score, decides an
    outcome."""

    steps: int = 200
    lr: float = 0.1
    optimizer: str = "sgd"
    loss_scale: float = 2000.0
    seed: int | None = 0

    def validate(self) -> None:
        super().validate()
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in EDIT_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(EDIT_OPTIMIZERS)}, got {self.optimizer!r}")


def edit_latents(
    teacher,
    z_src: torch.Tensor,
    emb_src: torch.Tensor,
    emb_tgt: torch.Tensor,
    config: EditConfig | None = None,
    *,
    z_init: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Return edited latents (same shape as ``z_src``); embeddings are (B, L, D) or (1, L, D).

    The optimisation starts at ``z_src`` (the method) or at ``z_init``: started at a known answer, the edit
    shows whether that answer is the score's fixed point — how far a perfect edit drifts under this teacher.
    """
    cfg = config or EditConfig()
    if cfg.t_range_end is not None and not cfg.t_range_steps:  # anneal over the whole edit
        cfg = cfg.replace(t_range_steps=max(1, cfg.steps - 1))
    b = z_src.shape[0]
    emb_src, emb_tgt = expand_batch(emb_src, b), expand_batch(emb_tgt, b)
    gen = torch.Generator(device=z_src.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    z_src = z_src.detach().float()
    if z_init is not None and z_init.shape != z_src.shape:
        raise ValueError(f"z_init must have the source's shape {tuple(z_src.shape)}, got {tuple(z_init.shape)}")
    z = (z_src if z_init is None else z_init.detach().to(z_src)).clone().requires_grad_(True)
    opt = EDIT_OPTIMIZERS[cfg.optimizer]([z], lr=cfg.lr)
    for step in tqdm(range(cfg.steps), desc=f"{cfg.method.upper()} edit", disable=not progress, leave=False):
        grad = cfg.grad(teacher, z_src, z.detach(), emb_src, emb_tgt, step, generator=gen, noise=cfg.noise(z_src, gen))
        opt.zero_grad(set_to_none=True)
        (cfg.loss_scale * surrogate_loss(z, grad)).backward()
        opt.step()
    return z.detach()


def edit_images(teacher, images: torch.Tensor, source: str, target: str, config: EditConfig | None = None, *, progress=False) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> edited images in [-1, 1]."""
    z_src = teacher.encode_images(images.to(teacher.device))
    emb_src, emb_tgt = teacher.encode_prompts([source]), teacher.encode_prompts([target])
    z = edit_latents(teacher, z_src, emb_src, emb_tgt, config, progress=progress)
    return teacher.decode_latents(z)
