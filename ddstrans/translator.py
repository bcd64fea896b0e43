"""``Translator``: a self-contained exported translator directory, loaded without pickle, one forward pass.

Directory layout (written by ``ddstrans.export``)::

    translator.json        format version, conditioning, resolution, teacher id, tasks, sha256 of every file
    README.md              model card
    generator/             config.json + diffusion_pytorch_model.safetensors
    tasks.safetensors      task prompt embeddings (names/prompts in translator.json)
    vae/                   the teacher's VAE (absent for pixel-space teachers)
    text_encoder/ tokenizer/   text-conditioned translators: to encode new prompt pairs

Only JSON, text and safetensors are read, and only files listed in ``translator.json``: the directory must hold
exactly the listed files, every listed path must stay inside it, and every file's sha256 is checked before use.
Weights are loaded by path (``safetensors.torch.load_file`` + ``load_state_dict(strict=True)``), never through a
library's file discovery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ddstrans.teacher import encode_text, vae_decode, vae_encode

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


def check_entries(root: Path, files: dict[str, str]) -> None:
    """Refuse, before reading any file, entries that could leave ``root``: absolute paths, ``..`` components,
    backslashes or drive letters, and paths through a symlink (a listed file or one of its parent directories)."""
    base = root.resolve()
    for rel in files:
        bad = (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or ":" in rel
               or any(part in ("", ".", "..") for part in rel.split("/")))
        if bad:
            raise TranslatorLoadError(f"{root}: translator.json lists {rel!r}, not a plain relative path inside the "
                                      "directory; refusing to load")
        p = root
        for part in rel.split("/"):
            p = p / part
            if p.is_symlink():
                raise TranslatorLoadError(f"{root}: {rel} goes through a symbolic link ({p.relative_to(root)}); "
                                          "refusing to load")
        if not (root / rel).resolve().is_relative_to(base):
            raise TranslatorLoadError(f"{root}: {rel} resolves outside the directory; refusing to load")


def verify_tree(root: Path, files: dict[str, str]) -> None:
    """Raise ``TranslatorLoadError`` unless the directory holds exactly the listed files (plus translator.json),
    each with its hash. Entry paths are checked first (``check_entries``), unlisted files next (a loader must
    never find an unverified file, e.g. a ``*.safetensors.index.json`` pointing at other weights), hashes last."""
    if not isinstance(files, dict) or not files:
        raise TranslatorLoadError(f"{root}: translator.json lists no file hashes; refusing to load unverified files "
                                  "(re-export it with `ddstrans export`)")
    check_entries(root, files)
    unlisted = [r for r in REQUIRED_FILES if r not in files]
    if unlisted:
        raise TranslatorLoadError(f"{root}: translator.json does not list {', '.join(unlisted)}; refusing to load")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise TranslatorLoadError(f"{root}: {rel} is a symbolic link; refusing to load")
        if p.is_file() and rel not in files and rel != "translator.json":
            raise TranslatorLoadError(f"{root}: unexpected file {rel} (not in translator.json); refusing to load")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise TranslatorLoadError(f"{root}: file {rel} listed in translator.json is missing")
        if sha256_file(p) != digest:
            raise TranslatorLoadError(
                f"{root}: {rel} does not match its sha256 in translator.json (tampered, truncated or corrupted); refusing to load")


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TranslatorLoadError(f"{path}: cannot read ({e})") from None


def load_component(model_cls, directory: Path, files: dict[str, str] | None, root: Path):
    """A diffusers/transformers model built from ``directory/config.json`` with the weights of the listed
    ``*.safetensors`` files of that directory, loaded by path (``safetensors.torch.load_file``) and with
    ``strict=True``: no library discovery (index files, other formats) decides what is read.

    ``files`` (the manifest) None: a referenced teacher directory outside the translator (the user's own teacher,
    not part of the translator's hashes): its canonical safetensors file is read."""
    from safetensors.torch import load_file

    cfg = _read_config(directory / "config.json")
    if files is None:  # the canonical single file of a diffusers/transformers save (not e.g. an fp16 variant)
        weights = [p for p in (directory / "diffusion_pytorch_model.safetensors", directory / "model.safetensors")
                   if p.is_file()][:1]
        if not weights:  # a sharded save of the user's own teacher: the library's loader, safetensors only
            return model_cls.from_pretrained(directory, use_safetensors=True).eval()
    else:
        prefix = directory.relative_to(root).as_posix() + "/"
        weights = [root / r for r in sorted(files) if r.startswith(prefix) and "/" not in r[len(prefix):]
                   and r.endswith(".safetensors")]
    if not weights:
        raise TranslatorLoadError(f"{directory}: no .safetensors weights")
    state: dict = {}
    try:
        for w in weights:
            state.update(load_file(str(w)))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad headers
        raise TranslatorLoadError(f"{directory}: cannot read weights ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if hasattr(model_cls, "from_config"):
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        model = model_cls.from_config(cfg)
    else:  # transformers: config class of the model
        model = model_cls(model_cls.config_class.from_dict(cfg))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TranslatorLoadError(f"{directory}: weights do not fit the config ({str(e).splitlines()[0]})") from None
    return model.eval()


class Translator:
    """Attributes: ``generator`` (TranslationUNet), ``vae`` (or None), ``task_table``, ``info`` (translator.json)."""

    def __init__(self, generator, task_table, info: dict, vae=None, tokenizer=None, text_encoder=None):
        self.generator, self.task_table, self.info, self.vae = generator, task_table, info, vae
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.latent_scale = float(info.get("latent_scale", 1.0))
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
        if not isinstance(info, dict):
            raise TranslatorLoadError(f"{meta_path}: not a JSON object")
        if info.get("format") != FORMAT or int(info.get("format_version", -1)) > FORMAT_VERSION:
            raise TranslatorLoadError(f"{meta_path}: unsupported format {info.get('format')!r} "
                                      f"version {info.get('format_version')!r} (this ddstrans reads {FORMAT_VERSION})")
        if verify:
            verify_tree(root, info.get("files", {}))
        elif info.get("files"):
            check_entries(root, info["files"])  # unverified, yet never outside the directory
        listed = info.get("files") or None  # the files to read, by name (verified above unless verify=False)
        gen = load_component(TranslationUNet, root / "generator", listed, root)
        table = TaskTable.load(root / "tasks.safetensors", {"tasks": info["tasks"], "meta": {}})
        ref = info.get("teacher_reference")  # components referenced instead of copied
        vae = None
        if info.get("has_vae"):
            copied = (root / "vae").is_dir()
            vae_dir = root / "vae" if copied else (Path(ref) / "vae" if ref else None)
            if vae_dir is None or not vae_dir.is_dir():
                raise TranslatorLoadError(f"{root}: the VAE is neither copied (vae/) nor found at the teacher reference {ref!r}")
            vae = load_component(AutoencoderKL, vae_dir, listed if copied else None, root if copied else vae_dir.parent)
        tokenizer = text_encoder = None
        if info["conditioning"] == "text":
            from transformers import AutoTokenizer, CLIPTextModel

            copied = (root / "text_encoder").is_dir()
            base = root if copied else (Path(ref) if ref else None)
            if base is not None and (base / "text_encoder").is_dir():
                tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")  # JSON/text files only (verified)
                text_encoder = load_component(CLIPTextModel, base / "text_encoder", listed if copied else None, base)
        tr = cls(gen, table, info, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder)
        return tr.to(device, dtype)

    def to(self, device=None, dtype=None) -> Translator:
        # dtype only when given: diffusers' ModelMixin.to warns about float32 modules whenever a dtype key is passed,
        # even None (an empty list of such modules included)
        cast = {"dtype": dtype} if dtype is not None else {}
        for m in (self.generator, self.vae, self.text_encoder):
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
        return vae_encode(self.vae, x.to(self.device), self.latent_scale)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, z, self.latent_scale)

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
        if self.text_encoder is None:
            raise ValueError("this translator was exported without its text encoder; it can only run its tasks")
        emb = encode_text(self.tokenizer, self.text_encoder, [source, target]).float().to(self.device)
        return None, emb[:1].expand(b, -1, -1), emb[1:].expand(b, -1, -1)

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
