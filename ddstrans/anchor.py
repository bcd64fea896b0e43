"""The anchor term: hold a generator's outputs to those of a frozen copy of itself where the score is silent.

Why: a phase that sharpens details at low noise also moves what earlier phases laid out (the shapes world's squares
shrink, though the per-image score at those timesteps keeps their size). The identity term holds the outputs to the
sources, which the edit must leave; held instead to the generator's own outputs at the phase's start, with the same
mask (``scores.identity_loss``: weighted by where the score does not ask for change), the generator may change only
what the score calls for from there.

The copy is taken once, at the first training step the term runs, from the weights the run exports (the EMA's when
EMA is on), and saved with every checkpoint, so a resumed run holds to the same copy. It is kept out of the module's
``state_dict`` and optimizer: a frozen reference, like the teacher.
"""

from __future__ import annotations

import copy

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ddstrans.schedules import phase_value
from ddstrans.scores import identity_loss

ANCHOR_CHECKPOINT_KEY = "anchor_generator"


class AnchorMixin:
    """``loss.anchor_weight_phases`` / ``loss.anchor_tasks`` for the Lightning module (which owns ``generator``,
    ``global_step`` and ``ema_state_dict``)."""

    def _init_anchor(self, phases: tuple[tuple[int, float], ...], task_mask: torch.Tensor | None) -> None:
        self._anchor_phases = phases
        self._anchor_task_mask = task_mask
        self._anchor_state: dict | None = None  # the copy's weights from a checkpoint, until first used
        object.__setattr__(self, "_anchor", None)  # not a submodule: out of state_dict, .to() and the optimizer

    def current_anchor_weight(self, step: int | None = None) -> float:
        """Weight of the anchor term at ``step`` (default: now): 0 before the first of ``loss.anchor_weight_phases``,
        then from each of its steps on, that phase's weight."""
        step = self.global_step if step is None else step
        return float(phase_value(step, 0.0, self._anchor_phases))

    def anchor_generator(self) -> torch.nn.Module:
        """The frozen copy of the generator the term holds outputs to (taken now if there is none yet)."""
        if self._anchor is None:
            anchor = copy.deepcopy(self.generator)
            if self._anchor_state is None:
                first = self._anchor_phases[0][0] if self._anchor_phases else 0
                if self.global_step > first:
                    rank_zero_warn(f"loss.anchor_weight_phases: the anchor is taken at step {self.global_step}, "
                                   f"not at its first phase's step {first} (the checkpoint resumed holds none)")
            anchor.load_state_dict(self._anchor_state if self._anchor_state is not None else self.ema_state_dict())
            anchor.requires_grad_(False).eval()
            object.__setattr__(self, "_anchor", anchor)
            self._anchor_state = None
        return self._anchor

    def anchor_term(self, z_tgt, z_src, grad, task_ids, emb_src, emb_tgt, reduction: str = "hw",
                    weight: torch.Tensor | None = None) -> torch.Tensor:
        """``scores.identity_loss`` toward the anchor's outputs for the same inputs instead of the sources
        (``weight``: one factor per sample, e.g. the 0/1 flags of ``loss.anchor_tasks``)."""
        with torch.no_grad():
            z_anchor = self.anchor_generator()(z_src, task_ids=task_ids, src_emb=emb_src, tgt_emb=emb_tgt).float()
        return identity_loss(z_tgt, z_anchor, grad, reduction, weight)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # a resumed run keeps the copy it loaded even through phases at weight 0, which never build it
        state = self._anchor.state_dict() if self._anchor is not None else self._anchor_state
        if state is not None:
            checkpoint[ANCHOR_CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._anchor_state = checkpoint.get(ANCHOR_CHECKPOINT_KEY)
        object.__setattr__(self, "_anchor", None)
