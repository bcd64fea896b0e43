"""A diffusers learning-rate schedule with step decays on top (``optim.scheduler``).

Why: a last phase at a lower learning rate (``milestones=[4000], gamma=0.1``) must keep the schedule the run had
until then (``constant_with_warmup``: its warm-up). Torch chains a warm-up and step decays only with
``SequentialLR``, whose second schedule counts steps from the switch, and diffusers' ``piecewise_constant`` has no
warm-up. Here the factor of the diffusers schedule named ``name`` is multiplied by
``ddstrans.schedules.step_decay_factor``. A config that already uses ``get_scheduler`` only changes its
``_target_`` and adds the two keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim.lr_scheduler import LambdaLR


def with_step_decay(optimizer, name: str = "constant", milestones: Sequence[int] = (), gamma: float = 0.1,
                    **kwargs) -> LambdaLR:
    """``diffusers.optimization.get_scheduler(name, optimizer, **kwargs)``, its learning rate times ``gamma`` at
    each of ``milestones`` (optimizer steps > 0)."""
    from diffusers.optimization import get_scheduler

    from ddstrans.schedules import step_decay_factor

    steps = tuple(int(m) for m in milestones)
    if any(m <= 0 for m in steps) or not float(gamma) > 0:
        raise ValueError(f"milestones must be steps > 0 and gamma > 0, got milestones={list(milestones)}, "
                         f"gamma={gamma}")
    sched = get_scheduler(name, optimizer=optimizer, **kwargs)
    if not isinstance(sched, LambdaLR):
        raise ValueError(f"with_step_decay needs a schedule that is a factor of the step; name={name!r} is not one")

    def decayed(factor):
        # a plain function, so LambdaLR's state_dict stores nothing of it (the config holds the settings)
        def lr_factor(step: int) -> float:
            return factor(step) * step_decay_factor(step, steps, gamma)
        return lr_factor

    sched.lr_lambdas = [decayed(f) for f in sched.lr_lambdas]
    return sched
