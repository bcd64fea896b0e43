"""Gradient accumulation that changes at a training step, not at an epoch.

Why: Lightning's ``GradientAccumulationScheduler`` changes the factor only when an epoch starts, but a run on
procedural or sharded data is often one long epoch. A last phase that wants a larger effective batch (e.g. a low
learning rate, where a batch's noise decides what survives) then needs the change at a step: a larger
``data.batch_size`` would need more memory, and a batch size that changes mid-epoch breaks the resumable sampler's
position (``ddstrans.data.resumable``).

Lightning zeroes the gradients at a batch whose index in the epoch is a multiple of the factor and steps after the
batch that completes such a window. A new factor therefore starts at the first batch, at or after its step, whose
index is a multiple of both the old and the new factor: no window mixes two factors, and no stale gradient of an
already applied window is added to the next one. The rule reads only the global step and the batch index, so a
resumed run switches at the same batch as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.callbacks import Callback


def accumulation_at(step: int, scheduling: Mapping[int, int], base: int = 1) -> int:
    """The factor in force at optimizer step ``step``: that of the largest ``scheduling`` key ``<= step``, else
    ``base``."""
    due = [k for k in scheduling if k <= step]
    return int(scheduling[max(due)]) if due else int(base)


def may_switch(batch_idx: int, current: int, new: int) -> bool:
    """Whether batch ``batch_idx`` (index in its epoch) starts a window of both factors."""
    return batch_idx % current == 0 and batch_idx % new == 0


class StepGradAccumulation(Callback):
    """Accumulate ``scheduling[s]`` batches per optimizer step from global step ``s`` on; before the first key,
    ``trainer.accumulate_grad_batches`` (the config's ``trainer.accumulate_grad_batches``).

    Example: ``scheduling={4000: 3}`` with ``data.batch_size=16`` makes each optimizer step from step 4,000 on see
    48 samples (the loss of each batch is divided by 3, as with a constant ``accumulate_grad_batches``).
    """

    def __init__(self, scheduling: Mapping[int, int]):
        try:
            sched = {int(k): int(v) for k, v in dict(scheduling).items()}
        except (TypeError, ValueError):
            raise ValueError(f"scheduling must map steps to factors, e.g. {{4000: 3}}, got {scheduling!r}") from None
        if not sched or any(k < 0 for k in sched) or any(v < 1 for v in sched.values()):
            raise ValueError(f"scheduling must map steps >= 0 to factors >= 1, e.g. {{4000: 3}}, got {scheduling!r}")
        self.scheduling = sched
        self.base: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("StepGradAccumulation needs automatic optimization (Lightning accumulates the "
                               "gradients); remove the callback for a module that steps its optimizer itself")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise RuntimeError("DeepSpeed fixes gradient accumulation at start-up; StepGradAccumulation cannot "
                               "change it during training")
        self.base = int(trainer.accumulate_grad_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        current = int(trainer.accumulate_grad_batches)
        new = accumulation_at(trainer.global_step, self.scheduling, self.base or 1)
        if new != current and may_switch(batch_idx, current, new):
            trainer.accumulate_grad_batches = new
