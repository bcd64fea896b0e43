"""The teacher's common machinery: identity and prompt cache, devices, images <-> latents.

:class:`TeacherBase` is what every family adapter shares; the adapters (``sd.py``, ``sdxl.py``, ``sd3.py``,
``flux.py``) add the denoiser call, the prompt encoding and sampling. A teacher is a plain object, not an
``nn.Module``: a LightningModule that holds it keeps it out of its ``state_dict``, its checkpoints and DDP's
gradient synchronisation.
"""

from __future__ import annotations

import abc
import hashlib
import os
from pathlib import Path

import torch

from ddstrans.embeddings import PromptEmbeddings
from ddstrans.teacher.latents import vae_decode, vae_encode, vae_scaling

LEGACY_KEY = "embedding"  # the one field of a single-tensor embedding (SD 1.x/2.x), as on disk


class TeacherLoadError(RuntimeError):
    """A teacher directory or hub id that cannot be loaded (message is one line, says what to fix)."""


def default_cache_dir() -> Path:
    root = os.environ.get("DDSTRANS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddstrans"
    )
    return Path(root) / "prompt_embeddings"


def fingerprint(root: Path, identity: str, extra: str = "") -> str:
    """Cache key of the text encoding: identity + every tokenizer/text-encoder config and weight size and mtime (+
    ``extra``, e.g. the token count), so a teacher retrained in place never reads the old embeddings."""
    h = hashlib.sha256(identity.encode())
    h.update(extra.encode())
    subs = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith(("tokenizer", "text_encoder")))
    for sub in subs:
        d = root / sub
        for f in sorted(d.iterdir()):
            h.update(f"{sub}/{f.name}".encode())
            if f.suffix in (".json", ".txt", ".model"):
                h.update(f.read_bytes())
            else:  # weights: size and modification time (hashing GBs of weights at every load is too slow)
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class TeacherBase(metaclass=abc.ABCMeta):  # noqa: B024 - ABCMeta for Teacher.register (virtual subclasses)
    """Shared state and behaviour. Subclasses set ``family``, ``model`` (the denoiser network), ``vae``,
    ``scheduler`` and implement ``_encode_fields`` (prompts -> dict of stacked tensors) and ``_uncond_fields``."""

    family = "base"
    guidance_mode = "cfg"  # cfg: unconditional + conditional branch; embedded: a guidance input; none: neither

    def _setup(self, *, identity: str, cache_dir) -> None:
        self.identity = identity
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.latent_scale, self.latent_shift = vae_scaling(self.vae)
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self._memory_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._uncond = None
        self.text_encoder_calls = 0  # how often the text encoders actually ran (cache diagnostics)
        self.channels_last = False  # set_channels_last()
        self.compiled = False  # compile()
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()

    def modules(self) -> list[torch.nn.Module]:
        """Every network of the teacher (denoiser, VAE, text encoders)."""
        return [m for m in (self.model, self.vae, *self.text_modules()) if m is not None]

    def text_modules(self) -> list[torch.nn.Module]:
        return []

    # ------------------------------------------------------------------ devices
    def to(self, device=None, dtype=None):
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        if device is not None:
            self._memory_cache = {p: {k: v.to(device) for k, v in f.items()} for p, f in self._memory_cache.items()}
            self._uncond = None
            self._moved(device)
        return self

    def _moved(self, device) -> None:  # noqa: B027 - an optional hook
        """Hook: move the subclass's own tensors."""

    def set_channels_last(self, enabled: bool = True):
        """Keep the denoiser's conv weights in channels_last (NHWC) memory format (and feed it NHWC latents).

        Opt-in: on CPU with the shapes teacher the fastest calls were ~11% faster, the median ~2% (noisy; see
        docs/performance.md). ``to()`` preserves the format afterwards."""
        self.model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)
        return self

    def compile(self, **kwargs):
        """``torch.compile`` the denoiser in place (``nn.Module.compile``: parameter names unchanged). Opt-in: the
        first call compiles (seconds to minutes); worth it for long GPU runs. ``kwargs`` go to ``torch.compile``."""
        self.model.compile(**kwargs)
        self.compiled = True
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    # ------------------------------------------------------------------ prompts
    def _disk_path(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(prompt.encode()).hexdigest()[:32]
        return self.cache_dir / self.identity / f"{key}.safetensors"

    def _load_cached(self, prompt: str) -> dict[str, torch.Tensor] | None:
        if prompt in self._memory_cache:
            return self._memory_cache[prompt]
        path = self._disk_path(prompt)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                fields = {k: v.to(self.device) for k, v in load_file(path).items()}
            except Exception:  # noqa: BLE001 - a broken cache file is re-computed, never fatal
                return None
            self._memory_cache[prompt] = fields
            return fields
        return None

    def _store(self, prompt: str, fields: dict[str, torch.Tensor]) -> None:
        self._memory_cache[prompt] = fields
        path = self._disk_path(prompt)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in fields.items()}, tmp, metadata={"prompt": prompt})
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs recomputation

    @staticmethod
    def _assemble(rows: list[dict[str, torch.Tensor]]):
        """Per-prompt fields -> a batch: a tensor for the single-tensor families, else ``PromptEmbeddings``."""
        stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return stacked[LEGACY_KEY] if set(stacked) == {LEGACY_KEY} else PromptEmbeddings(stacked)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str):
        """Prompt embeddings as the family's diffusers pipeline makes them (``encode_prompt``), in the teacher's
        dtype; cached in memory and on disk per teacher and prompt. SD 1.x/2.x: a (B, L, D) tensor; other families:
        :class:`PromptEmbeddings`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if self._load_cached(p) is None]
        if missing:
            fields = self._encode_fields(missing)
            self.text_encoder_calls += 1
            for i, p in enumerate(missing):
                self._store(p, {k: v[i].to(self.dtype) if v.is_floating_point() else v[i] for k, v in fields.items()})
        return self._assemble([self._memory_cache[p] for p in prompts])

    @property
    def uncond_embedding(self):
        """The unconditional branch of classifier-free guidance, a batch of one: what the family's pipeline uses
        when no negative prompt is given."""
        if self._uncond is None:
            fields = self._uncond_fields()
            self._uncond = self._assemble([{k: v[0].to(self.device, self.dtype) for k, v in fields.items()}])
        return self._uncond

    def _uncond_fields(self) -> dict[str, torch.Tensor]:
        return self._encode_fields([""])

    # ------------------------------------------------------------------ images <-> latents
    @property
    def image_multiple(self) -> int:
        """Image sizes must be multiples of this (the VAE factor; Flux's 2x2 packing doubles it)."""
        return self.downsample_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (float32). Pixel teachers: latents = images.

        Uses the VAE posterior mean by default (deterministic); ``sample=True`` draws from it.
        """
        f = self.image_multiple
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by {f} for this teacher")
        return vae_encode(self.vae, images, self.latent_scale, shift=self.latent_shift, sample=sample,
                          generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, clamped)."""
        return vae_decode(self.vae, latents, self.latent_scale, shift=self.latent_shift)

    @property
    def image_size(self) -> int:
        """The resolution the teacher was trained at (the denoiser's sample size times the VAE factor)."""
        return int(self.latent_size) * self.downsample_factor

    def describe(self) -> dict:
        return {
            "source": getattr(self, "source", None),
            "family": self.family,
            "prediction_type": self.prediction_type,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "latent_scale": self.latent_scale,
            "latent_shift": self.latent_shift,
            "image_size": self.image_size,
            "has_vae": self.vae is not None,
        }
