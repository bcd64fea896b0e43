"""The frozen text-to-image teacher: one interface for SD 1.x/2.x, SDXL, SD3 and Flux.

``Teacher.from_pretrained(path_or_hub_id)`` reads the directory's ``model_index.json`` (or its denoiser's config)
and returns the adapter of its family, every one a ``Teacher``:

- ``sd``: :class:`Teacher` (SD 1.x/2.x, SD-Turbo; epsilon/v/x0 prediction; optional VAE)
- ``sdxl``: :class:`SDXLTeacher` (SDXL, SDXL-Turbo)
- ``sd3``: :class:`SD3Teacher` (SD3, SD3.5; rectified flow)
- ``flux``: :class:`FluxTeacher` (Flux-dev with guidance embedding, Flux-schnell; rectified flow)

``encode_prompts`` returns a tensor (SD 1.x/2.x) or :class:`PromptEmbeddings` (the others); the rest of ddstrans
handles both through ``ddstrans.embeddings``. See docs/teachers.md.
"""

from ddstrans.embeddings import PromptEmbeddings
from ddstrans.teacher.base import TeacherLoadError, default_cache_dir
from ddstrans.teacher.latents import encode_text, vae_decode, vae_encode
from ddstrans.teacher.loading import (
    REQUIRED_COMPONENTS,
    SUPPORTED,
    _looks_like_hub_id,
    check_directory,
    detect_family,
)
from ddstrans.teacher.sd import Teacher, ddim_cfg_loop, ddim_scheduler


def __getattr__(name):
    if name in ("SDXLTeacher", "SD3Teacher", "FluxTeacher", "FlowTeacher"):
        from ddstrans.teacher import flow_teacher, flux, sd3, sdxl

        return {"SDXLTeacher": sdxl.SDXLTeacher, "SD3Teacher": sd3.SD3Teacher, "FluxTeacher": flux.FluxTeacher,
                "FlowTeacher": flow_teacher.FlowTeacher}[name]
    raise AttributeError(f"module 'ddstrans.teacher' has no attribute {name!r}")


__all__ = ["Teacher", "TeacherLoadError", "PromptEmbeddings", "REQUIRED_COMPONENTS", "SUPPORTED", "_looks_like_hub_id",
           "check_directory",
           "default_cache_dir", "detect_family", "ddim_cfg_loop", "ddim_scheduler", "encode_text", "vae_decode",
           "vae_encode"]
