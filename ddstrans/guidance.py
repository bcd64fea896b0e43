"""The DDS/SDS settings as one typed config, and the score gradient they define.

``Guidance`` is the one place the defaults live: the DDS reference settings (guidance 7.5 in both branches,
timesteps uniform in [50, 950), uniform weighting, fresh noise, no warm-up). Training (``DDSTranslationModule``,
whose ``configs/loss/dds.yaml`` holds only what training changes), per-image editing (``EditConfig`` extends it),
``ddstrans make-shards from-teacher`` and the benchmarks all read their settings from here.

Scheduled values use the ramps of ``ddstrans.schedules``: the guidance scale rises from ``guidance_start`` to
``guidance`` over ``warmup_steps`` (the DDS paper's warm-up against mode collapse), and the timestep range moves
from ``t_range`` to ``t_range_end`` over ``t_range_steps`` (and jumps to ``t_range_late`` from
``t_range_late_from_step`` on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ddstrans.flow import SIGMA_SAMPLINGS
from ddstrans.schedules import KINDS, guidance_at, phase_steps_increase, phase_value, t_range_at
from ddstrans.scores import (
    SCORE_SPACES,
    WEIGHTINGS,
    dds_grad,
    draw_timesteps,
    fresh_noise,
    mix_shared_noise,
    sds_grad,
    shared_noise,
)

METHODS = ("dds", "sds")


def _pair(value) -> tuple[int, int] | None:
    return None if value is None else tuple(int(v) for v in value)


def _phases(value) -> tuple[tuple[int, tuple[int, int]], ...] | None:
    """``[[from_step, [t_min, t_max]], ...]`` or ``[{from_step:, t_range:}, ...]`` (a config's spelling) as tuples."""
    if value is None:
        return None
    try:
        pairs = [(p["from_step"], p["t_range"]) if isinstance(p, Mapping) else tuple(p) for p in value]
        return tuple((int(step), _pair(r)) for step, r in pairs)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"t_range_phases must be [[from_step, [t_min, t_max]], ...], got {value!r}") from None


def _names(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Guidance:
    """DDS/SDS settings. Every field is a parameter of the score or of its schedule:

    method: ``dds`` (source prompt as the reference branch) or ``sds`` (no reference; an ablation).
    guidance: target classifier-free guidance scale.
    guidance_start, warmup_steps, warmup_kind: the scale rises from ``guidance_start`` to ``guidance`` over
        ``warmup_steps`` (``guidance_start`` None or ``warmup_steps`` 0: constant); ``warmup_kind`` is a
        ``ddstrans.schedules`` ramp (linear, cosine, constant).
    source_guidance: scale of the DDS source branch (None: the same as the target's, as the reference).
    guidance_low_t, guidance_low: samples with t below ``guidance_low_t`` use ``guidance_low`` in both branches
        (0: off). At low noise guidance amplifies a teacher's errors more than it edits.
    guidance_low_from_step: ``guidance_low`` applies from this training step on (0: from the start). A change the
        teacher makes only at high guidance (the shapes world's square) must be learned there first; a lower guidance
        then sharpens it, as per-image editing draws its cleanest result at a lower guidance than it needs to start.
    guidance_low_tasks: the tasks ``guidance_low`` applies to (None: every task); the others keep the scheduled
        scale. One task's change may need the lower scale (the shapes world's square) while another holds only at
        the higher one (its checkered background is lost at 1.5 in some runs).
    t_range: timesteps are drawn uniformly in ``[t_min, t_max)``.
    t_range_end, t_range_steps: the range moves linearly to ``t_range_end`` over ``t_range_steps`` steps (<= 0:
        it stays at ``t_range``).
    t_range_late, t_range_late_from_step: from step ``t_range_late_from_step`` on, timesteps come from
        ``t_range_late`` instead (None: no such phase). A last phase at low noise refines what the anneal learned
        (a square's corners) without the high-noise samples that would move it again.
    t_range_phases: ``((from_step, (t_min, t_max)), ...)`` with increasing steps: from each ``from_step`` on,
        timesteps come from that range (the last phase begun wins; None: no phases). A recipe of several phases
        (lay a change out at high noise, sharpen it at very low noise, restore its size in between) as one run.
    t_range_mix, t_range_mix_prob, t_range_mix_from_step: from step ``t_range_mix_from_step`` on, each sample draws
        its timestep from ``t_range_mix`` with probability ``t_range_mix_prob`` and from the scheduled range
        otherwise (None or 0: off). Why: a phase at very low noise draws a shapes-world square's sides crisply but
        shrinks it, and the range above holds its size; one batch can hold both bands. In epsilon space a sample
        of the low band weighs more (an image error moves the noise prediction by sqrt(abar / (1 - abar)) times
        it), so its share must be small: at 0.5 in [1, 20) the batch acts almost as a low-noise phase.
    weighting: the per-timestep weight ``w(t)`` (``scores.WEIGHTINGS``).
    shared_noise_prob, shared_noise_seed, shared_noise_tasks: with probability ``shared_noise_prob`` a sample uses
        one fixed noise (``scores.shared_noise`` of ``shared_noise_seed``) instead of fresh noise, only for the
        tasks named in ``shared_noise_tasks`` (None: every task). With the same noise everywhere the teacher's
        choice among equally good edits (a checkerboard's phase) becomes a function of the input.
    sigma_sampling: flow teachers (SD3, Flux): ``uniform`` or ``logit_normal`` sigma in ``t_range`` (scheduler
        units, after the scheduler's shift); None: the teacher's (uniform). DDPM-family teachers ignore it.
    score_space: ``eps`` (the DDS gradient in epsilon space, the same meaning for every family) or, for flow
        teachers, ``velocity`` (the difference of the guided velocities).
    """

    method: str = "dds"
    guidance: float = 7.5
    guidance_start: float | None = None
    warmup_steps: int = 0
    warmup_kind: str = "linear"
    source_guidance: float | None = None
    guidance_low_t: int = 0
    guidance_low: float = 1.0
    guidance_low_from_step: int = 0
    guidance_low_tasks: tuple[str, ...] | None = None
    t_range: tuple[int, int] = (50, 950)
    t_range_end: tuple[int, int] | None = None
    t_range_steps: int = 0
    t_range_late: tuple[int, int] | None = None
    t_range_late_from_step: int = 0
    t_range_phases: tuple[tuple[int, tuple[int, int]], ...] | None = None
    t_range_mix: tuple[int, int] | None = None
    t_range_mix_prob: float = 0.0
    t_range_mix_from_step: int = 0
    weighting: str = "uniform"
    shared_noise_prob: float = 0.0
    shared_noise_seed: int = 0
    shared_noise_tasks: tuple[str, ...] | None = None
    sigma_sampling: str | None = None
    score_space: str = "eps"
    _shared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("t_range", _pair(self.t_range))
        set_("t_range_end", _pair(self.t_range_end))
        set_("t_range_late", _pair(self.t_range_late))
        set_("t_range_phases", _phases(self.t_range_phases))
        set_("t_range_mix", _pair(self.t_range_mix))
        set_("t_range_mix_from_step", int(self.t_range_mix_from_step or 0))
        set_("t_range_late_from_step", int(self.t_range_late_from_step or 0))
        set_("shared_noise_tasks", _names(self.shared_noise_tasks))
        set_("guidance_low_tasks", _names(self.guidance_low_tasks))
        set_("guidance_low_t", int(self.guidance_low_t or 0))
        set_("guidance_low_from_step", int(self.guidance_low_from_step or 0))
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first parameter out of its range."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.warmup_kind not in KINDS:
            raise ValueError(f"warmup_kind must be one of {KINDS}, got {self.warmup_kind!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        ranges = [(name, getattr(self, name)) for name in ("t_range", "t_range_end", "t_range_late", "t_range_mix")]
        ranges += [(f"t_range_phases (the phase from step {step})", r) for step, r in self.t_range_phases or ()]
        for name, r in ranges:
            if r is not None and not (len(r) == 2 and 0 <= r[0] < r[1] <= 1000):
                raise ValueError(f"{name} must be (t_min, t_max) with 0 <= t_min < t_max <= 1000, got {r}")
        if not 0 <= self.guidance_low_t <= 1000:
            raise ValueError(f"guidance_low_t must be in [0, 1000] (0: off), got {self.guidance_low_t}")
        if self.guidance_low_from_step < 0:
            raise ValueError(f"guidance_low_from_step must be >= 0, got {self.guidance_low_from_step}")
        if self.t_range_late_from_step < 0:
            raise ValueError(f"t_range_late_from_step must be >= 0, got {self.t_range_late_from_step}")
        if not phase_steps_increase(self.t_range_phases or ()):
            raise ValueError(f"t_range_phases must start at increasing steps >= 0, got {list(self.t_range_phases)}")
        if not 0.0 <= float(self.t_range_mix_prob) <= 1.0:
            raise ValueError(f"t_range_mix_prob must be in [0, 1], got {self.t_range_mix_prob}")
        if self.t_range_mix_from_step < 0:
            raise ValueError(f"t_range_mix_from_step must be >= 0, got {self.t_range_mix_from_step}")
        if self.sigma_sampling not in (None, *SIGMA_SAMPLINGS):
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS} or None, got {self.sigma_sampling!r}")
        if self.score_space not in SCORE_SPACES:
            raise ValueError(f"score_space must be one of {SCORE_SPACES}, got {self.score_space!r}")
        if not 0.0 <= float(self.shared_noise_prob) <= 1.0:
            raise ValueError(f"shared_noise_prob must be in [0, 1], got {self.shared_noise_prob}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None, **extra):
        """The settings of ``settings`` (a dict or config) whose keys are fields; other keys are ignored."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in dict(settings or {}).items() if k in names}, **extra)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for ranges), as a config file holds them."""
        plain = lambda v: [plain(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
        return {name: plain(getattr(self, name)) for name in self.field_names()}

    # ------------------------------------------------------------------ schedules
    def scale_at(self, step: int) -> float:
        """The guidance scale at ``step`` (the warm-up ramp)."""
        return guidance_at(step, self.guidance, self.guidance_start, int(self.warmup_steps), self.warmup_kind)

    def t_range_at(self, step: int) -> tuple[int, int]:
        """The timestep range at ``step``: the anneal, or the range of the last phase begun by ``step`` (each of
        ``t_range_phases``, and ``t_range_late`` from ``t_range_late_from_step``)."""
        late = () if self.t_range_late is None else ((self.t_range_late_from_step, self.t_range_late),)
        # stable sort: a phase begun with the late one comes after it, and wins
        phases = sorted((*late, *(self.t_range_phases or ())), key=lambda phase: phase[0])
        begun = phase_value(step, None, phases)
        if begun is not None:
            return begun
        return t_range_at(step, self.t_range, self.t_range_end, int(self.t_range_steps))

    def t_mix_prob_at(self, step: int) -> float:
        """The share of samples drawn from ``t_range_mix`` at ``step`` (0 before ``t_range_mix_from_step`` or
        without a ``t_range_mix``)."""
        if self.t_range_mix is None or step < self.t_range_mix_from_step:
            return 0.0
        return float(self.t_range_mix_prob)

    def timesteps(self, teacher, z: torch.Tensor, step: int, generator: torch.Generator | None = None):
        """The timesteps of one score evaluation at ``step``: drawn in ``t_range_at(step)``, a ``t_mix_prob_at``
        share of them replaced by draws in ``t_range_mix``; None when no mix is in force (the score draws them)."""
        prob = self.t_mix_prob_at(step)
        if prob == 0.0:
            return None
        main = draw_timesteps(teacher, z, self.t_range_at(step), generator, self.sigma_sampling)
        mix = draw_timesteps(teacher, z, self.t_range_mix, generator, self.sigma_sampling)
        pick = torch.rand(z.shape[0], generator=generator, device=main.device if generator is None
                          else generator.device).to(main.device) < prob
        return torch.where(pick, mix, main)

    def guidance_low_t_at(self, step: int) -> int:
        """The low-noise threshold in force at ``step``: ``guidance_low_t`` from ``guidance_low_from_step`` on, else
        0 (off)."""
        return self.guidance_low_t if step >= self.guidance_low_from_step else 0

    # ------------------------------------------------------------------ noise policy
    def shared(self, z: torch.Tensor) -> torch.Tensor:
        """The shared noise of one sample of ``z``, made once per shape, device and dtype."""
        key = (tuple(z.shape[1:]), z.device, z.dtype)
        if key not in self._shared:
            self._shared.clear()
            self._shared[key] = shared_noise(z.shape[1:], self.shared_noise_seed, device=z.device, dtype=z.dtype)
        return self._shared[key]

    def noise(self, z: torch.Tensor, generator: torch.Generator | None = None,
              eligible: torch.Tensor | None = None) -> torch.Tensor | None:
        """The noise of one score evaluation: None (the score draws fresh noise) when ``shared_noise_prob`` is 0;
        the shared noise for every sample when it is 1 and every sample is ``eligible`` (None: all); else fresh
        noise with that fraction of eligible samples replaced by the shared noise."""
        prob = float(self.shared_noise_prob)
        if prob == 0.0:
            return None
        if prob == 1.0 and eligible is None:
            return self.shared(z).expand_as(z)
        return mix_shared_noise(fresh_noise(z, generator), self.shared(z), prob, generator, eligible)

    # ------------------------------------------------------------------ the score
    def grad(self, teacher, z_src: torch.Tensor | None, z_tgt: torch.Tensor, emb_src: torch.Tensor | None,
             emb_tgt: torch.Tensor, step: int = 0, *, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, guidance: float | None = None,
             low_eligible: torch.Tensor | None = None, return_info: bool = False):
        """The DDS (or SDS) gradient on ``z_tgt`` at training or edit ``step``: guidance and timestep range from
        their schedules (``guidance`` overrides the scale, e.g. the target scale at validation), ``noise`` and ``t``
        drawn by the score unless given; ``guidance_low`` only for the samples flagged in ``low_eligible`` (the
        caller's per-sample flags of ``guidance_low_tasks``; None: every sample). SDS ignores ``z_src`` and
        ``emb_src``."""
        if t is None:
            t = self.timesteps(teacher, z_tgt, step, generator)
        kw = dict(t=t, noise=noise, guidance_scale=self.scale_at(step) if guidance is None else guidance,
                  weighting=self.weighting, t_range=self.t_range_at(step), generator=generator,
                  return_info=return_info, guidance_low_t=self.guidance_low_t_at(step),
                  guidance_low=float(self.guidance_low), guidance_low_eligible=low_eligible,
                  space=self.score_space, sigma_sampling=self.sigma_sampling)
        dtype = getattr(teacher, "dtype", None) or emb_tgt.dtype
        if self.method == "sds":
            return sds_grad(teacher, z_tgt, emb_tgt.to(dtype), **kw)
        return dds_grad(teacher, z_src, z_tgt, emb_src.to(dtype), emb_tgt.to(dtype),
                        source_guidance_scale=self.source_guidance, **kw)
