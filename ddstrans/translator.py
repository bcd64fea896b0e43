"""``Translator``: a self-contained exported translator directory, loaded without pickle, one forward pass.

Directory layout (written by ``ddstrans.export``)::

    translator.json        format version, conditioning, resolution, teacher id, tasks, sha256 of every file
    README.md              model card
    generator/             config.json + diffusion_pytorch_model.safetensors
    tasks.safetensors      task prompt embeddings (names/prompts in translator.json)
    vae/                   the teacher's VAE (absent for pixel-space teachers)
    text_encoder*/ tokenizer*/ text-conditioned translators: to encode new prompt pairs (SDXL, SD3, Flux: all of
                           the family's text encoders, and its model_index.json)

Only JSON and safetensors are read; every file's sha256 is checked against ``translator.json`` before use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ddstrans.embeddings import expand_batch
from ddstrans.teacher.latents import encode_text, vae_decode, vae_encode

FORMAT = "ddstrans.translator"
FORMAT_VERSION = 1
REQUIRED_FILES = ("generator/config.json", "generator/diffusion_pytorch_model.safetensors", "tasks.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class TranslatorLoadError(RuntimeError):
    """A translator directory that is missing, malformed, or fails its integrity check."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path, exclude: Sequence[str] = ("translator.json",)) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), except ``exclude``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def verify_tree(root: Path, files: dict[str, str]) -> None:
    """Raise ``TranslatorLoadError`` unless every listed file exists with its hash and no pickle file was added."""
    if not files:
        raise TranslatorLoadError(f"{root}: translator.json lists no file hashes; refusing to load unverified files "
                                  "(re-export it with `ddstrans export`)")
    unlisted = [r for r in REQUIRED_FILES if r not in files]
    if unlisted:
        raise TranslatorLoadError(f"{root}: translator.json does not list {', '.join(unlisted)}; refusing to load")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise TranslatorLoadError(f"{root}: file {rel} listed in translator.json is missing")
        if sha256_file(p) != digest:
            raise TranslatorLoadError(
                f"{root}: {rel} does not match its sha256 in translator.json (tampered, truncated or corrupted); refusing to load")
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and rel not in files:
            raise TranslatorLoadError(f"{root}: unexpected file {rel} (not in translator.json); refusing to load")


class Translator:
    """Attributes: ``generator`` (TranslationUNet), ``vae`` (or None), ``task_table``, ``info`` (translator.json)."""

    def __init__(self, generator, task_table, info: dict, vae=None, tokenizer=None, text_encoder=None,
                 prompt_encoder=None):
        self.generator, self.task_table, self.info, self.vae = generator, task_table, info, vae
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.prompt_encoder = prompt_encoder  # SDXL, SD3, Flux: ddstrans.teacher.pipeline.PromptEncoder
        self.latent_scale = float(info.get("latent_scale", 1.0))
        self.latent_shift = float(info.get("latent_shift", 0.0))
        self.resolution = int(info["resolution"])
        self.conditioning = info["conditioning"]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        verify: bool = True) -> Translator:
        from diffusers import AutoencoderKL

        from ddstrans.generator import TranslationUNet
        from ddstrans.tasks import TaskTable

        root = Path(path)
        meta_path = root / "translator.json"
        if not meta_path.is_file():
            raise TranslatorLoadError(f"{root}: no translator.json (not an exported translator; see `ddstrans export`)")
        try:
            info = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise TranslatorLoadError(f"{meta_path}: invalid JSON ({e})") from None
        if info.get("format") != FORMAT or int(info.get("format_version", -1)) > FORMAT_VERSION:
            raise TranslatorLoadError(f"{meta_path}: unsupported format {info.get('format')!r} "
                                      f"version {info.get('format_version')!r} (this ddstrans reads {FORMAT_VERSION})")
        if verify:
            verify_tree(root, info.get("files", {}))
        gen = TranslationUNet.from_pretrained(root / "generator", use_safetensors=True)
        table = TaskTable.load(root / "tasks.safetensors", {"tasks": info["tasks"], "meta": {}})
        ref = info.get("teacher_reference")  # components referenced instead of copied
        vae = None
        if info.get("has_vae"):
            vae_dir = root / "vae" if (root / "vae").is_dir() else (Path(ref) / "vae" if ref else None)
            if vae_dir is None or not vae_dir.is_dir():
                raise TranslatorLoadError(f"{root}: the VAE is neither copied (vae/) nor found at the teacher reference {ref!r}")
            vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
        tokenizer = text_encoder = prompt_encoder = None
        family = info.get("teacher", {}).get("family", "sd")
        if info["conditioning"] == "text":
            base = root if (root / "text_encoder").is_dir() else (Path(ref) if ref else None)
            if base is not None and (base / "text_encoder").is_dir():
                if family == "sd":
                    from transformers import AutoTokenizer, CLIPTextModel

                    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
                    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True)
                else:
                    from ddstrans.teacher.pipeline import PromptEncoder

                    prompt_encoder = PromptEncoder.from_pretrained(base, family)
        tr = cls(gen, table, info, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, prompt_encoder=prompt_encoder)
        return tr.to(device, dtype)

    def to(self, device=None, dtype=None) -> Translator:
        # dtype only when given: diffusers' ModelMixin.to warns about float32 modules whenever a dtype key is passed,
        # even None (an empty list of such modules included)
        cast = {"dtype": dtype} if dtype is not None else {}
        extra = self.prompt_encoder.modules() if self.prompt_encoder is not None else []
        for m in (self.generator, self.vae, self.text_encoder, *extra):
            if m is not None:
                m.to(device=device, **cast)
                m.eval()
                m.requires_grad_(False)
        self.task_table.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def tasks(self) -> list[str]:
        return self.task_table.names

    # ------------------------------------------------------------------ images <-> latents
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return vae_encode(self.vae, x.to(self.device), self.latent_scale, shift=self.latent_shift)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, z, self.latent_scale, shift=self.latent_shift)

    # ------------------------------------------------------------------ translation
    def _condition(self, b: int, task: str | None, source: str | None, target: str | None):
        if task is not None and (source is not None or target is not None):
            raise ValueError("give either task= or source=/target=, not both")
        if task is not None:
            ids = torch.full((b,), self.task_table.index(task), dtype=torch.long, device=self.device)
            src, tgt = self.task_table.first(ids)
            return ids, src, tgt
        if source is None or target is None:
            raise ValueError(f"give task= (one of {', '.join(self.tasks)}) or, for text translators, source= and target=")
        if self.conditioning != "text":
            raise ValueError("this translator is task-id conditioned: new prompt pairs need a text-conditioned one; "
                             f"use task= (one of {', '.join(self.tasks)})")
        if self.text_encoder is None and self.prompt_encoder is None:
            raise ValueError("this translator was exported without its text encoder; it can only run its tasks")
        if self.prompt_encoder is not None:
            emb = self.prompt_encoder([source, target]).float().to(self.device)
        else:
            emb = encode_text(self.tokenizer, self.text_encoder, [source, target]).float().to(self.device)
        return None, expand_batch(emb[:1], b), expand_batch(emb[1:], b)

    @torch.no_grad()
    def translate_latents(self, z: torch.Tensor, task: str | None = None, *, source: str | None = None,
                          target: str | None = None) -> torch.Tensor:
        """One generator forward pass on latents (B, C, h, w)."""
        z = z.to(self.device).float()
        ids, src, tgt = self._condition(z.shape[0], task, source, target)
        return self.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt).float()

    @torch.no_grad()
    def translate_tensor(self, x: torch.Tensor, task: str | None = None, *, source=None, target=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] at the translator's resolution -> translated images in [-1, 1]."""
        return self.decode(self.translate_latents(self.encode(x), task, source=source, target=target))

    def __call__(self, images: Image.Image | Sequence[Image.Image], task: str | None = None, *,
                 source: str | None = None, target: str | None = None, keep_size: bool = True):
        """Translate PIL image(s): resized to the training resolution, one forward pass for the whole batch,
        resized back to each input's size (``keep_size``). Returns a list (or one image for one input)."""
        from ddstrans.images import pil_to_tensor, tensor_to_pil, to_rgb

        single = isinstance(images, Image.Image)
        ims = [images] if single else list(images)
        if not ims:
            return []
        r = self.resolution
        x = pil_to_tensor([to_rgb(im).resize((r, r), Image.BICUBIC) for im in ims])
        out = tensor_to_pil(self.translate_tensor(x, task, source=source, target=target))
        if keep_size:
            out = [o.resize(im.size, Image.BICUBIC) if o.size != im.size else o for o, im in zip(out, ims)]
        return out[0] if single else out
