"""ddstrans: single-pass image translation networks trained with Delta Denoising Score."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Lazy public API: `import ddstrans` stays fast; heavy modules load on first use.
_EXPORTS = {
    "Teacher": "ddstrans.teacher",
    "TeacherLoadError": "ddstrans.teacher",
    "PromptEmbeddings": "ddstrans.teacher",
    "dds_grad": "ddstrans.scores",
    "sds_grad": "ddstrans.scores",
    "surrogate_loss": "ddstrans.scores",
    "sample_timesteps": "ddstrans.scores",
    "EditConfig": "ddstrans.editing",
    "edit_images": "ddstrans.editing",
    "edit_latents": "ddstrans.editing",
    "TranslationUNet": "ddstrans.generator",
    "Translator": "ddstrans.translator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddstrans' has no attribute {name!r}")
