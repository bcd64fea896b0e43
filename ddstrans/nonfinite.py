"""Non-finite steps: skip them on every rank alike, count them, and stop a run that keeps producing them.

A diverged generator or an overflowing half-precision teacher shows up as a NaN/inf loss, score entry or
translation. Such a step must change no weight (its gradients are dropped before the optimizer step), must be
skipped by every DDP rank at the same step (the flag is reduced), and a streak of them must end the run with an
error that names the likely causes, instead of spinning on skipped steps or ending as a finite-looking success.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss: training stops instead of spinning on skipped steps."""


class NonFiniteGuard:
    """``LightningModule`` mixin. Needs ``self.loss_cfg["max_consecutive_nonfinite"]``, ``self.guidance``,
    ``self.teacher``, ``self.generator`` and ``self.ema``; holds the counters ``skipped_steps``,
    ``consecutive_skipped``, ``skipped_samples`` (saved in checkpoints) and the flags ``_skip_step``,
    ``_val_nonfinite``."""

    def _init_nonfinite(self) -> None:
        self._skip_step = False
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.skipped_samples = 0  # samples the data loader dropped (non-finite, unreadable), all ranks
        self._val_nonfinite = False

    def _record_step_health(self, loss: torch.Tensor, info, z_tgt: torch.Tensor, batch) -> None:
        """Decide whether this step is skipped and count it; ``info.nonfinite`` is the score's count of zeroed
        entries.

        A non-finite loss, score entry or translation (a diverged generator: the score of an inf latent is zeroed,
        and its loss would read a harmless 0) must be skipped on every rank alike (DDP): reduce the flag, together
        with the count of samples the data loader skipped. This is the one host sync per step."""
        bad = ((~torch.isfinite(loss.detach())) | (info.nonfinite > 0)
               | ~torch.isfinite(z_tgt.detach()).all()).float().reshape(())
        dropped = batch.get("skipped_samples") if isinstance(batch, Mapping) else None
        flags = torch.stack([bad.to(self.device), torch.as_tensor(dropped if dropped is not None else 0,
                                                                   dtype=torch.float32, device=self.device).sum()])
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        bad_n, dropped_n = flags.tolist()
        self.skipped_samples += int(dropped_n)
        # Under gradient accumulation one optimizer step spans several batches: a bad one anywhere in the window
        # skips the whole step (its NaN gradient is already summed in), and counts once. The flag is cleared after
        # each optimizer step (``_end_optimizer_window``).
        window_bad = self._skip_step
        self._skip_step = window_bad or bad_n > 0
        if bad_n > 0 and not window_bad:
            self.skipped_steps += 1
            self.consecutive_skipped += 1
            self._check_nonfinite_streak()
        elif not self._skip_step:
            self.consecutive_skipped = 0

    def _end_optimizer_window(self) -> None:
        """Called after each optimizer step: the next batch starts a new window."""
        self._skip_step = False

    def _check_nonfinite_streak(self) -> None:
        """Raise ``NonFiniteLossError`` after ``loss.max_consecutive_nonfinite`` skipped steps in a row (0: never).
        The skip flag is reduced over ranks, so every rank raises at the same step."""
        limit = int(self.loss_cfg.get("max_consecutive_nonfinite") or 0)
        if limit <= 0 or self.consecutive_skipped < limit:
            return
        lr = None
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0].get("lr")
        tdt = str(self.teacher.dtype).replace("torch.", "")
        lr_now = f"optim.lr, now {lr:g}" if isinstance(lr, (int, float)) else "optim.lr"
        half = " - try model.teacher_dtype=bfloat16 or float32" if tdt == "float16" else ""
        raise NonFiniteLossError(
            f"the {self.guidance.method.upper()} loss was non-finite (NaN/inf) for {self.consecutive_skipped} "
            f"consecutive steps (up to global step {self.global_step}; {self.skipped_steps} skipped in all). "
            f"Likely causes: learning rate too high ({lr_now}: lower it, or set trainer.gradient_clip_val); "
            f"teacher overflow in {tdt}{half}; bad inputs (NaN/inf pixels or latents). Skipped steps did not "
            "change the weights, so the last checkpoint is usable. loss.max_consecutive_nonfinite sets the "
            "limit (0: never stop)")

    def _check_validation_finite(self) -> None:
        """A non-finite validation metric counts as a non-finite step (towards the streak limit) and is
        remembered: a run whose last validation is non-finite ends with ``NonFiniteLossError`` (see
        ``on_train_end``), never with a finite-looking result."""
        v = self.trainer.callback_metrics.get("val/dds_norm")
        self._val_nonfinite = v is not None and not bool(torch.isfinite(torch.as_tensor(v)).all())
        if self._val_nonfinite:
            self.consecutive_skipped += 1
            self._check_nonfinite_streak()

    def on_train_end(self) -> None:
        """Refuse to end as a success with diverged weights: non-finite generator or EMA parameters, or a last
        validation that was non-finite."""
        params = list(self.generator.parameters()) + (list(self.ema.shadow_params) if self.ema is not None else [])
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        if finite and not self._val_nonfinite:
            return
        what = "the generator's weights are non-finite" if not finite else "the last validation was non-finite"
        raise NonFiniteLossError(
            f"training diverged: {what} at global step {self.global_step} ({self.skipped_steps} step(s) skipped as "
            "non-finite). Likely causes: learning rate too high (lower optim.lr, or set trainer.gradient_clip_val); "
            "teacher overflow in float16 (model.teacher_dtype=bfloat16 or float32); bad inputs")
