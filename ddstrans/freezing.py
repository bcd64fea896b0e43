"""Train only some of the generator's weights from a training step on.

Why: a phase of a run may want to change one part of the generator and hold the rest, e.g. a last phase at
very low noise that should sharpen edges with the full-resolution layers while the deeper layers, which lay out
the shapes, keep what the earlier phases taught them.

The frozen weights are left out at the optimizer step, not cut from the graph: their gradient is dropped
(``grad = None``) just before the step, and torch optimizers leave such a parameter and its state (moments,
step count, weight decay) untouched. The graph, DDP's buckets and the optimizer's parameter groups stay as they
were, so a phase may begin and end anywhere in a run, under DDP, and a resumed run freezes at the same step as the
uninterrupted one (the rule reads only the global step). The gradient clipping and the module's
``train/grad_norm`` that follow see only the trained weights' gradients. The forward and backward cost what
they did before: this is a choice of what learns, not a saving.
"""

from __future__ import annotations

import re

from lightning.pytorch.callbacks import Callback

from ddstrans.schedules import phase_steps_increase, phase_value


def parse_trainable_phases(phases) -> tuple[tuple[int, re.Pattern | None], ...]:
    """``[[from_step, pattern], ...]`` -> ``((step, compiled or None), ...)``. A pattern is a regular expression
    searched in the generator's parameter names (``unet.up_blocks.2.…``); ``null`` trains every weight again."""
    try:
        parsed = tuple((int(step), None if pattern in (None, "") else re.compile(str(pattern)))
                       for step, pattern in phases)
    except re.error as e:
        raise ValueError(f"phases: bad regular expression {e.pattern!r}: {e}") from None
    except (TypeError, ValueError):
        raise ValueError(f"phases must be [[from_step, pattern or null], ...], e.g. [[4000, 'up_blocks\\.2']], "
                         f"got {phases!r}") from None
    if not parsed or not phase_steps_increase(parsed):
        raise ValueError(f"phases must be a non-empty list whose steps are >= 0 and increasing, got {phases!r}")
    return parsed


def trains(name: str, pattern: re.Pattern | None) -> bool:
    """Whether a phase with ``pattern`` trains the parameter ``name``: ``pattern`` finds it, or is None (all)."""
    return pattern is None or pattern.search(name) is not None


def trainable_names(names, pattern: re.Pattern | None) -> list[str]:
    """The parameter names a phase trains."""
    return [n for n in names if trains(n, pattern)]


class TrainablePhases(Callback):
    """From each ``phases`` step on, train only the generator parameters whose names match its pattern.

    Example: ``phases=[[4125, 'up_blocks\\.2|conv_norm_out|conv_out'], [4400, null]]`` trains only the
    full-resolution decoder block and the output layers in steps 4,125–4,399, then every weight again.
    """

    def __init__(self, phases):
        self.phases = parse_trainable_phases(phases)

    def setup(self, trainer, pl_module, stage: str) -> None:
        names = [n for n, p in pl_module.generator.named_parameters() if p.requires_grad]
        for step, pattern in self.phases:
            if pattern is not None and not trainable_names(names, pattern):
                raise ValueError(f"phases: the pattern {pattern.pattern!r} (from step {step}) matches none of the "
                                 f"generator's trainable parameters, e.g. {names[:3]}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pattern = phase_value(trainer.global_step, None, self.phases)
        if pattern is None:  # every weight trains
            return
        for name, p in pl_module.generator.named_parameters():
            if not trains(name, pattern):
                p.grad = None
