"""Sampling and DDS settings that belong to a teacher: read from ``ddstrans_settings.json`` beside its
``model_index.json``, else the defaults of its family's diffusers pipeline.

A small teacher can need settings far from Stable Diffusion's (the shipped shapes teacher samples cleanly with DDIM
20 steps, guidance 2, eta 1, and draws noisy blobs at Stable Diffusion's 50 deterministic steps and guidance), so the settings
travel with the weights. Who uses them: ``Teacher.sample`` (its defaults), ``ddstrans make-shards from-teacher``,
``ddstrans edit`` (``edit``) and training (``train``). An explicit argument, flag or config value always wins.

The file (every section and key optional; unknown keys are errors that name the key)::

    {
      "format": "ddstrans-teacher-settings/1",
      "sampling": {"num_inference_steps": 20, "guidance_scale": 2.0, "eta": 1.0, "timestep_spacing": "leading"},
      "edit":  {"guidance": 3.0, "t_range": [50, 600], "steps": 100, "lr": 0.02},
      "train": {}
    }

``sampling``: the keys of :class:`Sampling`. ``edit``: fields of ``ddstrans.editing.EditConfig`` (the
``ddstrans.guidance.Guidance`` fields plus steps, lr, loss_scale, seed) that per-image editing changes.
``train``: ``Guidance`` fields that training changes. Both DDS sections are overrides of ``Guidance``'s defaults,
which stay in ``ddstrans.guidance`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddstrans.guidance import Guidance

SETTINGS_FILE = "ddstrans_settings.json"
FORMAT = "ddstrans-teacher-settings/1"
SPACINGS = ("leading", "trailing", "linspace")


class TeacherSettingsError(ValueError):
    """A settings file that cannot be used (one line, names the file and the bad key)."""


@dataclass(frozen=True)
class Sampling:
    """Text-to-image sampling settings (DDIM with classifier-free guidance).

    timestep_spacing, clip_sample: None keeps the scheduler config's.
    """

    num_inference_steps: int = 50
    guidance_scale: float = Guidance.guidance  # Stable Diffusion's, as the DDS reference's
    eta: float = 0.0
    timestep_spacing: str | None = None
    clip_sample: bool | None = None

    def __post_init__(self):
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        for name in ("guidance_scale", "eta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS} or null, got {self.timestep_spacing!r}")
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise ValueError(f"clip_sample must be true, false or null, got {self.clip_sample!r}")

    def replace(self, **changes) -> Sampling:
        """These settings with ``changes`` whose value is not None (explicit arguments win)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The defaults of each family's diffusers pipeline: num_inference_steps and guidance_scale of its ``__call__``
# (diffusers 0.42.1: StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline;
# tests/test_teacher_settings.py checks them against the installed diffusers). Keyed by model_index.json's
# ``_class_name``. SD3 and Flux sample with flow-matching schedulers (no eta); ``Teacher.sample`` runs DDIM.
FAMILY_SAMPLING: dict[str, tuple[str, Sampling]] = {
    # SD's guidance is the DDS reference's (Guidance's default)
    "StableDiffusionPipeline": ("sd", Sampling(num_inference_steps=50, guidance_scale=Guidance.guidance, eta=0.0)),
    "StableDiffusionXLPipeline": ("sdxl", Sampling(num_inference_steps=50, guidance_scale=5.0, eta=0.0)),
    "StableDiffusion3Pipeline": ("sd3", Sampling(num_inference_steps=28, guidance_scale=7.0)),
    "FluxPipeline": ("flux", Sampling(num_inference_steps=28, guidance_scale=3.5)),
}
SECTIONS = ("sampling", "edit", "train")


def _edit_fields() -> tuple[str, ...]:
    from ddstrans.editing import EditConfig

    return EditConfig.field_names()


@dataclass(frozen=True)
class TeacherSettings:
    """A teacher's recommended settings. ``source`` says where they come from (the file, the family's pipeline,
    or ddstrans's defaults); ``edit`` and ``train`` hold only the DDS settings that differ from ``Guidance``'s."""

    sampling: Sampling = field(default_factory=Sampling)
    edit: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    source: str = "ddstrans defaults"

    def edit_config(self, **explicit):
        """``EditConfig`` with this teacher's ``edit`` settings, then ``explicit`` (values not None) over them."""
        from ddstrans.editing import EditConfig

        return EditConfig(**{**self.edit, **{k: v for k, v in explicit.items() if v is not None}})

    def train_loss(self, loss: Mapping[str, Any]) -> dict[str, Any]:
        """A run's ``loss`` config with this teacher's ``train`` settings in the keys the config leaves at
        ``Guidance``'s default (a key set to the default value counts as unset: the composed config cannot tell)."""
        defaults = Guidance().to_dict()
        out = dict(loss)
        for k, v in self.train.items():
            if k not in out or out[k] == defaults.get(k):
                out[k] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "sampling": self.sampling.to_dict(), "edit": dict(self.edit),
                "train": dict(self.train)}


def parse_settings(data: Any, where: str = SETTINGS_FILE) -> TeacherSettings:
    """Validate the JSON object ``data``; ``TeacherSettingsError`` names ``where`` and the bad key."""
    if not isinstance(data, dict):
        raise TeacherSettingsError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"format", *SECTIONS})
    if unknown:
        raise TeacherSettingsError(f"{where}: unknown key {unknown[0]!r}; known: format, {', '.join(SECTIONS)}")
    if data.get("format", FORMAT) != FORMAT:
        raise TeacherSettingsError(f"{where}: format must be {FORMAT!r}, got {data['format']!r}")
    known = {"sampling": tuple(f.name for f in dataclasses.fields(Sampling)), "edit": _edit_fields(),
             "train": Guidance.field_names()}
    sections = {}
    for name in SECTIONS:
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            raise TeacherSettingsError(f"{where}: {name} must be an object, got {type(sec).__name__}")
        bad = sorted(set(sec) - set(known[name]))
        if bad:
            raise TeacherSettingsError(f"{where}: unknown key {name}.{bad[0]}; known: {', '.join(known[name])}")
        sections[name] = sec
    try:
        sampling = Sampling(**sections["sampling"])
    except ValueError as e:
        raise TeacherSettingsError(f"{where}: sampling.{e}") from None
    from ddstrans.editing import EditConfig

    for name, cls in (("edit", EditConfig), ("train", Guidance)):
        try:
            cls(**sections[name])
        except (ValueError, TypeError) as e:
            raise TeacherSettingsError(f"{where}: {name}.{e}") from None
    return TeacherSettings(sampling, dict(sections["edit"]), dict(sections["train"]), source=where)


def family_of(root: str | Path) -> str | None:
    """model_index.json's ``_class_name`` (None without the file)."""
    path = Path(root) / "model_index.json"
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def load_settings(root: str | Path | None, default: TeacherSettings | None = None) -> TeacherSettings:
    """The settings of the teacher directory ``root``: its ``ddstrans_settings.json``, else its family's pipeline
    defaults (``FAMILY_SAMPLING``), else ``default`` (None: ddstrans's defaults)."""
    if root is None:
        return default or TeacherSettings()
    path = Path(root) / SETTINGS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise TeacherSettingsError(f"{path}: not valid JSON ({e})") from None
        return parse_settings(data, str(path))
    cls = family_of(root)
    if cls in FAMILY_SAMPLING:
        return TeacherSettings(sampling=FAMILY_SAMPLING[cls][1], source=f"{cls} defaults")
    return default or TeacherSettings()


def write_settings(root: str | Path, settings: TeacherSettings) -> Path:
    """Write ``settings`` into the teacher directory ``root`` (write-then-rename)."""
    path = Path(root) / SETTINGS_FILE
    parse_settings(settings.to_dict(), str(path))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path
