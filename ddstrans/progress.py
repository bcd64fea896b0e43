"""A training progress bar that counts optimizer steps toward ``trainer.max_steps``.

Why: Lightning's ``TQDMProgressBar`` counts the batches of the current epoch. Runs here are bounded by
``max_steps`` on procedural, sharded or cycling data, so that count misleads in three ways: with gradient
accumulation it runs ahead of the steps (three batches per step from some step on), when the data's epoch ends
it starts again at zero under a new epoch number, and after a resume from a checkpoint saved mid-epoch Lightning
skips ``on_train_epoch_start``, where the bar gets its total, so the whole resumed run shows ``n/?``. One bar for
the run, at ``trainer.global_step`` of ``max_steps``, reads the same fresh, accumulated and resumed, and its rate
and time left are in steps, the unit of every schedule, checkpoint and phase.

Runs bounded by epochs only (``max_steps=-1``) keep Lightning's per-epoch bar.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar shows ``global_step / max_steps`` for the whole run.

    Args are ``TQDMProgressBar``'s: ``refresh_rate`` is in optimizer steps here.
    """

    def _by_steps(self, trainer: Any) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._by_steps(trainer):
            return
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        # tqdm's rate and time left count from ``initial``: a resumed run's speed is that of the steps it runs
        bar.initial = bar.n = trainer.global_step
        bar.set_description("Training")
        bar.refresh()

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:  # inside an accumulation window: no step taken
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
