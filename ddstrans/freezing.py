"""Train only some of the generator's weights from a training step on (``TrainablePhases``), or from only some of
the samples (``LowNoiseRouting``).

Why: a phase of a run may want to change one part of the generator and hold the rest, e.g. a last phase at
very low noise that should sharpen edges with the full-resolution layers while the deeper layers, which lay out
the shapes, keep what the earlier phases taught them.

``TrainablePhases``' frozen weights are left out at the optimizer step, not cut from the graph: their gradient is dropped
(``grad = None``) just before the step, and torch optimizers leave such a parameter and its state (moments,
step count, weight decay) untouched. The graph, DDP's buckets and the optimizer's parameter groups stay as they
were, so a phase may begin and end anywhere in a run, under DDP, and a resumed run freezes at the same step as the
uninterrupted one (the rule reads only the global step). The gradient clipping and the module's
``train/grad_norm`` that follow see only the trained weights' gradients. The forward and backward cost what
they did before: this is a choice of what learns, not a saving. ``LowNoiseRouting`` cuts the graph per sample
instead, at one module's inputs (its docstring says how).
"""

from __future__ import annotations

import re

import torch
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


class _MaskSampleGrads(torch.autograd.Function):
    """Identity forward; backward multiplies each sample's gradient by ``keep`` (read at backward time, so the
    mask may be set after the forward, once the samples' timesteps are drawn)."""

    @staticmethod
    def forward(ctx, x, router):
        ctx.router = router
        return x.clone()  # a new node (a returned input or view of it could not be modified in place after)

    @staticmethod
    def backward(ctx, grad):
        keep = ctx.router.keep
        if keep is None:
            return grad, None
        if keep.shape[0] != grad.shape[0]:
            raise RuntimeError(f"LowNoiseRouting: {keep.shape[0]} per-sample flags for a batch of {grad.shape[0]}")
        return grad * keep.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


class LowNoiseRouting(Callback):
    """From ``from_step`` on, the samples whose score timestep is below ``below_t`` teach only the generator's layers
    from ``module`` on; the other samples teach every layer.

    Why: at very low noise the score decides where each side of a shape ends, but the deeper layers that learn from
    it also move the shape (the shapes world's squares shrink). Routing those samples' gradient to the last layers
    asks whether they can draw the sides while the deeper layers learn only from the noise levels that lay out the
    shape. Freezing (``TrainablePhases``) chooses what learns per step; this chooses it per sample, within one
    batch. Measured in the shapes world, it keeps the squares' size but draws fewer of them and costs the colors
    kept PSNR (docs/experiments/shape-change-cause.md, "Routing the low-noise samples to the last block").

    How: a forward pre-hook on ``module`` (e.g. ``unet.up_blocks.2``, a name in the generator) passes its tensor
    inputs (hidden states, skip connections, the time/task embedding) through an identity whose backward zeroes the
    gradient of the flagged samples. Their gradient still reaches ``module`` and every layer after it; nothing
    before it sees them. The flags are set before each backward from the module's ``step_timesteps`` (the
    timesteps its score drew), in the teacher's units, so gradient accumulation and DDP route each micro-batch by
    its own samples. The forward cost is unchanged.
    """

    def __init__(self, below_t: float, module: str = "unet.up_blocks.2", from_step: int = 0):
        if not float(below_t) > 0:
            raise ValueError(f"below_t must be > 0 (a timestep in the teacher's units), got {below_t!r}")
        if int(from_step) < 0:
            raise ValueError(f"from_step must be >= 0, got {from_step!r}")
        self.below_t, self.module, self.from_step = float(below_t), str(module), int(from_step)
        self.keep: torch.Tensor | None = None
        self._handle = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            target = pl_module.generator.get_submodule(self.module)
        except AttributeError:
            blocks = [n for n, _ in pl_module.generator.named_children()]
            raise ValueError(f"module: the generator has no submodule {self.module!r} (its children: {blocks})") from None
        if self._handle is None:
            self._handle = target.register_forward_pre_hook(self._route_inputs, with_kwargs=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _route_inputs(self, _module, args, kwargs):
        if not (torch.is_grad_enabled() and _module.training):
            return None
        return _map_tensors(args, self._wrap), _map_tensors(kwargs, self._wrap)

    def _wrap(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskSampleGrads.apply(x, self) if x.requires_grad else x

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        t = getattr(pl_module, "step_timesteps", None)
        self.keep = None if t is None or trainer.global_step < self.from_step else routed_keep(t, self.below_t)
        if self.keep is not None:  # the share of samples that taught only the routed layers
            pl_module.log("train/routed_share", 1.0 - self.keep.float().mean(), batch_size=self.keep.shape[0])

    def on_after_backward(self, trainer, pl_module) -> None:
        self.keep = None


def routed_keep(t: torch.Tensor, below_t: float) -> torch.Tensor:
    """Per sample: whether its gradient reaches the layers before the routed module (its timestep >= ``below_t``)."""
    return t.detach().float() >= below_t


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it (tuples, lists and dicts followed)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj
