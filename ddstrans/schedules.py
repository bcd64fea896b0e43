"""Step-dependent schedules as pure functions: classifier-free-guidance warm-up and the timestep range.

The DDS paper needed a CFG warm-up against mode collapse: guidance starts low and reaches its target over
``warmup_steps``. The timestep range can likewise move from ``start`` to ``end`` over ``steps``.
"""

from __future__ import annotations

import math

KINDS = ("constant", "linear", "cosine")


def _progress(step: int, steps: int) -> float:
    if steps <= 0:
        return 1.0
    return min(max(step / steps, 0.0), 1.0)


def _ramp(p: float, kind: str) -> float:
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * p)
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {KINDS}")


def guidance_at(step: int, target: float, start: float | None = None, warmup_steps: int = 0, kind: str = "linear") -> float:
    """Guidance scale at ``step``: from ``start`` (default: ``target``) to ``target`` over ``warmup_steps``."""
    if start is None or warmup_steps <= 0:
        return float(target)
    return float(start + (target - start) * _ramp(_progress(step, warmup_steps), kind))


def t_range_at(
    step: int,
    start: tuple[int, int] = (50, 950),
    end: tuple[int, int] | None = None,
    steps: int = 0,
    kind: str = "linear",
) -> tuple[int, int]:
    """Timestep range ``[t_min, t_max)`` at ``step``, interpolated from ``start`` to ``end`` over ``steps``."""
    lo, hi = int(start[0]), int(start[1])
    if end is None or steps <= 0:
        return lo, hi
    r = _ramp(_progress(step, steps), kind)
    lo = round(lo + (int(end[0]) - lo) * r)
    hi = round(hi + (int(end[1]) - hi) * r)
    return lo, max(hi, lo + 1)


def weight_at(step: int, weight: float, start: int = 0, ramp_steps: int = 0, kind: str = "linear") -> float:
    """A loss term's weight at ``step``: 0 before ``start``, then raised to ``weight`` over ``ramp_steps``
    (at once when ``ramp_steps <= 0``), so a term can join after what it would hinder has been learned."""
    if step < start:
        return 0.0
    return float(weight) * _ramp(_progress(step - start, ramp_steps), kind)


def phase_value(step: int, base, phases=()):
    """The value of the last of ``phases`` (``((from_step, value), ...)``, steps in order; of equal ones the later
    wins) begun by ``step``; ``base`` before the first, so a setting can change between the phases of a run."""
    begun = [value for start, value in phases if step >= start]
    return begun[-1] if begun else base


def phase_steps_increase(phases) -> bool:
    """Whether ``phases`` (``((from_step, value), ...)``) start at steps >= 0 in strictly increasing order: the order
    ``phase_value`` reads them in, so a config that lists them otherwise is refused rather than reordered."""
    steps = [step for step, _ in phases]
    return all(step >= 0 for step in steps) and steps == sorted(set(steps))


def warmup_cosine_at(step: int, peak: float, warmup: int, total: int, floor_frac: float = 0.0) -> float:
    """A learning rate at optimizer step ``step`` (0-based): linear warm-up to ``peak`` over ``warmup`` steps (the
    first step already at ``peak / warmup``), then a half cosine down to ``floor_frac * peak`` at step ``total``,
    held there after it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def step_decay_factor(step: int, milestones=(), gamma: float = 0.1) -> float:
    """``gamma`` to the number of ``milestones`` reached by ``step`` (torch's ``MultiStepLR`` as a factor)."""
    return float(gamma) ** sum(int(step) >= int(m) for m in milestones)
