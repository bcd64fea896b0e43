"""Teachers held as their diffusers pipeline (SDXL, SD3, Flux).

Why the pipeline object: its ``encode_prompt`` *is* the family's prompt encoding (two or three text encoders,
pooled vectors, T5 token counts, zeros for an empty negative prompt); calling it, rather than re-writing it, keeps
the embeddings equal to what the pipeline samples with, and its ``__call__`` samples with the directory's own
scheduler. The adapter adds what DDS needs and the pipeline does not expose: one denoiser call on given noisy
latents, in a fixed convention (epsilon for DDPM-family teachers, velocity for flow teachers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddstrans.teacher.base import TeacherBase, TeacherLoadError, fingerprint, first_line

# pipeline defaults (diffusers): the T5 token count of encode_prompt
T5_TOKENS = {"sd3": 256, "flux": 512}


class PipelineTeacher(TeacherBase):
    """Common part of the pipeline-held adapters. Subclasses set ``family``, ``pipeline_class``, and implement
    ``_init_family``, ``_encode_fields``, ``_pipeline_inputs`` and the denoiser call."""

    pipeline_class = ""
    default_steps = 50
    default_guidance = 5.0

    def __init__(self, pipe, *, identity: str = "teacher", cache_dir=None):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.model = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        self._init_family()
        self._setup(identity=identity, cache_dir=cache_dir)

    def _init_family(self) -> None:
        raise NotImplementedError

    @staticmethod
    def encode_with(pipe, prompts: list[str], device, max_sequence_length=None) -> dict[str, torch.Tensor]:
        """The family's prompt encoding through ``pipe.encode_prompt`` (shared with ``PromptEncoder``)."""
        raise NotImplementedError

    def _encode_fields(self, prompts):
        return self.encode_with(self.pipe, prompts, self.device, self.max_sequence_length)

    def text_modules(self):
        return [m for m in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if m is not None]

    @classmethod
    def load(cls, root: Path, identity: str, cache_dir, kw: dict):
        import diffusers

        pipe_cls = getattr(diffusers, cls.pipeline_class)
        extra = cls._absent_components(root)
        try:
            pipe = pipe_cls.from_pretrained(root, **extra, **kw)
        except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many types
            raise TeacherLoadError(f"cannot load {cls.family} teacher {str(root)!r} with {cls.pipeline_class}: "
                                   f"{first_line(e)}") from None
        t5 = cls._t5_tokens(pipe)
        return cls(pipe, identity=fingerprint(root, identity, f"{cls.family}:t5={t5}"), cache_dir=cache_dir)

    @classmethod
    def _absent_components(cls, root: Path) -> dict:
        return {}

    @classmethod
    def _t5_tokens(cls, pipe) -> int | None:
        """The pipeline's ``max_sequence_length`` default, capped at the T5 tokenizer's ``model_max_length``."""
        default = T5_TOKENS.get(cls.family)
        tok = getattr(pipe, "tokenizer_3", None) if cls.family == "sd3" else getattr(pipe, "tokenizer_2", None)
        if default is None:
            return None
        if tok is None:
            return default
        return int(min(default, tok.model_max_length))

    @property
    def max_sequence_length(self) -> int | None:
        return self._t5_tokens(self.pipe)

    # ------------------------------------------------------------------ sampling
    def _pipeline_inputs(self, emb, uncond, latents: torch.Tensor) -> dict:
        """Embeddings and initial latents in the pipeline's ``__call__`` arguments."""
        raise NotImplementedError

    def _from_pipeline_latents(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return out

    @torch.no_grad()
    def sample(self, prompts: list[str], *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None, size: int | None = None, latents: torch.Tensor | None = None,
               **unsupported) -> torch.Tensor:
        """Text-to-image through the family's pipeline and its own scheduler (images in [-1, 1], (B, 3, H, W));
        ``latents``: the initial noise (B, C, h, w), else drawn from ``generator`` as the pipeline draws it."""
        extra = {k: v for k, v in unsupported.items() if v not in (None, 0.0)}
        if extra:
            raise ValueError(f"{', '.join(extra)} apply to DDIM sampling of SD 1.x/2.x teachers, not to {self.family}")
        size = int(size or self.image_size)
        if size % self.image_multiple:
            raise ValueError(f"size {size} must be a multiple of {self.image_multiple} for this teacher")
        h = w = size // self.downsample_factor
        shape = (len(prompts), self.latent_channels, h, w)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        emb = self.encode_prompts(prompts)
        from ddstrans.embeddings import expand_batch

        uncond = expand_batch(self.uncond_embedding, len(prompts))
        out = self.pipe(**self._pipeline_inputs(emb, uncond, latents.to(self.device, self.dtype)),
                        num_inference_steps=int(num_inference_steps or self.settings.sampling.num_inference_steps),
                        guidance_scale=float(self.settings.sampling.guidance_scale if guidance_scale is None
                                             else guidance_scale),
                        height=size, width=size, output_type="latent", return_dict=False)[0]
        return self.decode_latents(self._from_pipeline_latents(out.float(), h, w))


class PromptEncoder:
    """A family's prompt encoding without its denoiser and VAE: text-conditioned translators encode new prompt
    pairs with it. ``root`` holds the text encoders, tokenizers and ``model_index.json``."""

    def __init__(self, family: str, pipe):
        self.family, self.pipe = family, pipe
        self.teacher_class = PIPELINE_TEACHERS[family]

    @classmethod
    def from_pretrained(cls, root: Path, family: str) -> PromptEncoder:
        import diffusers

        tcls = PIPELINE_TEACHERS[family]
        skip = {"vae": None, "scheduler": None, ("unet" if family == "sdxl" else "transformer"): None}
        pipe = getattr(diffusers, tcls.pipeline_class).from_pretrained(  # weights: safetensors only, never pickle
            root, use_safetensors=True, **skip, **tcls._absent_components(root))
        return cls(family, pipe)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    @torch.no_grad()
    def __call__(self, prompts: list[str]):
        from ddstrans.embeddings import PromptEmbeddings

        device = self.modules()[0].device
        tcls = self.teacher_class
        return PromptEmbeddings(tcls.encode_with(self.pipe, list(prompts), device, tcls._t5_tokens(self.pipe)))


def _as_teacher(cls):
    """Every family adapter is a ``Teacher`` (``isinstance`` holds) without inheriting SD 1.x/2.x's methods."""
    from ddstrans.teacher.sd import Teacher

    Teacher.register(cls)
    return cls


_as_teacher(PipelineTeacher)


def _registry():
    from ddstrans.teacher.flux import FluxTeacher
    from ddstrans.teacher.sd3 import SD3Teacher
    from ddstrans.teacher.sdxl import SDXLTeacher

    return {"sdxl": SDXLTeacher, "sd3": SD3Teacher, "flux": FluxTeacher}


class _Lazy(dict):
    def __missing__(self, key):
        self.update(_registry())
        return dict.__getitem__(self, key)


PIPELINE_TEACHERS: dict[str, type[PipelineTeacher]] = _Lazy()
