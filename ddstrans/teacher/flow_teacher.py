"""What the rectified-flow teachers (SD3, Flux) share: velocity convention, sigma of a timestep, the shift of their
scheduler, and sampling of training timesteps (``ddstrans.flow``)."""

from __future__ import annotations

import torch

from ddstrans.flow import sample_flow_timesteps
from ddstrans.teacher.pipeline import PipelineTeacher


class FlowTeacher(PipelineTeacher):
    """``prediction_type == "flow"``: ``predict_velocity(z_t, t, emb, guidance=None)`` returns ``v = eps - x0``
    (float32) at float timesteps ``t`` in scheduler units (``sigma = t / num_train_timesteps``).

    ``sigma_sampling`` (``uniform`` | ``logit_normal``), ``logit_mean``, ``logit_std``: how training timesteps are
    drawn; the scheduler's shift applies on top (``use_shift=False`` turns it off)."""

    sigma_sampling = "uniform"
    logit_mean = 0.0
    logit_std = 1.0
    use_shift = True

    def _init_flow(self, latent_channels: int, latent_size: int, context_dim: int) -> None:
        self.prediction_type = "flow"
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.latent_channels, self.latent_size, self.context_dim = latent_channels, latent_size, context_dim

    def timestep_shift(self, latent_hw: tuple[int, int]) -> float:
        """The scheduler's shift for latents of size ``latent_hw`` (1 without one)."""
        return float(self.scheduler.config.get("shift", 1.0) or 1.0)

    def sample_timesteps(self, batch_size: int, t_range, *, latent_hw, device=None, generator=None,
                         sampling: str | None = None) -> torch.Tensor:
        """Float timesteps in ``t_range`` (scheduler units) drawn per ``sigma_sampling`` with the shift."""
        return sample_flow_timesteps(
            batch_size, t_range, num_train_timesteps=self.num_train_timesteps,
            sampling=sampling or self.sigma_sampling, shift=self.timestep_shift(latent_hw) if self.use_shift else 1.0,
            logit_mean=self.logit_mean, logit_std=self.logit_std, device=device, generator=generator)
