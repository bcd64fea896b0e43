"""What a training checkpoint carries beyond Lightning's own keys: the EMA and the run's ``ddstrans`` payload.

Only ``generator.*`` tensors are in the module's ``state_dict``; everything else a checkpoint needs to be exported
or resumed without the run's config (generator class and config, task table and its tensors, the teacher's
description, the resolved run config, the last metrics and the non-finite counters) goes under
``checkpoint[CHECKPOINT_KEY]``, and the EMA state under ``checkpoint["ema"]``. ``ddstrans.export`` reads them back.
"""

from __future__ import annotations

from typing import Any

CHECKPOINT_KEY = "ddstrans"
CHECKPOINT_FORMAT = 1


class CheckpointMixin:
    """``LightningModule`` mixin. Needs ``generator``, ``task_table``, ``teacher``, ``run_config``, ``ema`` and
    ``_load_ema_state`` (``ddstrans.ema.EMAMixin``; and ``_ema_swapped``, ``_ema_from_checkpoint``) and the
    counters of ``ddstrans.nonfinite.NonFiniteGuard``."""

    def checkpoint_payload(self) -> dict[str, Any]:
        metrics = {}
        if self._trainer is not None:
            for k, v in self.trainer.callback_metrics.items():
                try:
                    metrics[k] = float(v)
                except (TypeError, ValueError):
                    pass
        return {
            "format": CHECKPOINT_FORMAT,
            "generator_class": type(self.generator).__name__,
            "generator_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.generator.config.items()
                                 if not k.startswith("_")},
            "tasks": self.task_table.to_dict(),
            "task_tensors": self.task_table.tensors(),
            "teacher": {"source": getattr(self.teacher, "source", None),
                        "root": str(getattr(self.teacher, "root", "")) or None,
                        **self.teacher.describe()},
            "run_config": self.run_config,
            "metrics": metrics,
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped": self.consecutive_skipped,
            "skipped_samples": self.skipped_samples,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            if self._ema_swapped:  # never save EMA weights as the raw weights
                raise RuntimeError("checkpoint requested while EMA weights are swapped in")
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_payload()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self._load_ema_state(checkpoint["ema"])
            self._ema_from_checkpoint = True
        payload = checkpoint.get(CHECKPOINT_KEY, {})
        self.skipped_steps = int(payload.get("skipped_steps", 0))
        self.consecutive_skipped = int(payload.get("consecutive_skipped", 0))
        self.skipped_samples = int(payload.get("skipped_samples", 0))
