"""Zero-shot editing: optimise one image's latent with DDS (or SDS) against the teacher.

Reference settings (the DDS authors' notebook): latent initialised to the source, SGD with lr 0.1 on
2000 x surrogate loss, 200 steps, guidance 7.5, t uniform in [50, 950).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddstrans.schedules import t_range_at
from ddstrans.scores import DEFAULT_T_RANGE, dds_grad, sds_grad, shared_noise, surrogate_loss
from ddstrans.teacher.embeddings import expand_batch


@dataclass
class EditConfig:
    steps: int = 200
    lr: float = 0.1
    guidance_scale: float = 7.5
    loss_scale: float = 2000.0
    t_range: tuple[int, int] = DEFAULT_T_RANGE
    # optional: move the range linearly to this one over the edit (large t first for layout, small t last for
    # detail), as ``loss.t_range_end`` does in training
    t_range_end: tuple[int, int] | None = None
    method: str = "dds"  # "dds" | "sds"
    weighting: str = "uniform"
    seed: int | None = 0
    # optional: one noise tensor (``scores.shared_noise`` of this seed) for every image and step instead of fresh
    # noise, as ``loss.shared_noise_prob=1`` in training: shows which choices the noise, not the input, decides
    shared_noise_seed: int | None = None
    # optional: steps whose t is below guidance_low_t use guidance_low (scores.guidance_for_timesteps), as in training
    guidance_low_t: int = 0
    guidance_low: float = 1.0

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.method not in ("dds", "sds"):
            raise ValueError(f"method must be 'dds' or 'sds', got {self.method!r}")
        for name in ("t_range", "t_range_end"):
            r = getattr(self, name)
            if r is not None and not (len(r) == 2 and 0 <= r[0] < r[1] <= 1000):
                raise ValueError(f"{name} must be (t_min, t_max) with 0 <= t_min < t_max <= 1000, got {r}")


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
    cfg.validate()
    b = z_src.shape[0]
    emb_src, emb_tgt = expand_batch(emb_src, b), expand_batch(emb_tgt, b)
    gen = torch.Generator(device=z_src.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    z_src = z_src.detach().float()
    if z_init is not None and z_init.shape != z_src.shape:
        raise ValueError(f"z_init must have the source's shape {tuple(z_src.shape)}, got {tuple(z_init.shape)}")
    z = (z_src if z_init is None else z_init.detach().to(z_src)).clone().requires_grad_(True)
    noise = None
    if cfg.shared_noise_seed is not None:
        noise = shared_noise(z_src.shape[1:], cfg.shared_noise_seed, device=z_src.device).expand_as(z_src)
    opt = torch.optim.SGD([z], lr=cfg.lr)
    for step in tqdm(range(cfg.steps), desc=f"{cfg.method.upper()} edit", disable=not progress, leave=False):
        t_range = t_range_at(step, cfg.t_range, cfg.t_range_end, max(1, cfg.steps - 1))
        kw = dict(guidance_scale=cfg.guidance_scale, t_range=t_range, weighting=cfg.weighting, generator=gen, noise=noise,
                  guidance_low_t=cfg.guidance_low_t, guidance_low=cfg.guidance_low)
        if cfg.method == "dds":
            grad = dds_grad(teacher, z_src, z.detach(), emb_src, emb_tgt, **kw)
        else:
            grad = sds_grad(teacher, z.detach(), emb_tgt, **kw)
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
