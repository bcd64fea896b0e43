"""``Translator``: a self-contained exported translator directory, loaded without pickle, one forward pass.

Directory layout (written by ``ddstrans.export``)::

    translator.json        format version, conditioning, resolution, teacher id, tasks, sha256 of every file
    README.md              model card
    generator/             config.json + diffusion_pytorch_model.safetensors
    tasks.safetensors      task prompt embeddings (names/prompts in translator.json)
    vae/                   the teacher's VAE (absent for pixel-space teachers)
    text_encoder*/ tokenizer*/ text-conditioned translators: to encode new prompt pairs (SDXL, SD3, Flux: all of
                           the family's text encoders, and its model_index.json)

A LoRA translator exported with ``merge_adapters=False`` (format version 2) holds ``generator/config.json`` and
``generator/adapters.safetensors`` instead of the generator's weights, and references its base teacher by directory,
hub id and weight hash (``ddstrans.lora_export``); loading finds the base (or takes ``base``), checks the hash and
folds the adapters in.

Only JSON, text and safetensors are read, and only files listed in ``translator.json``: the directory must hold
exactly the listed files, every listed path must stay inside it, and every file's sha256 is checked before use.
Weights are loaded by path (``safetensors.torch.load_file`` + ``load_state_dict(strict=True)``), never through a
library's file discovery.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ddstrans.embeddings import expand_batch
from ddstrans.teacher.latents import encode_text, vae_decode, vae_encode
from ddstrans.translator_files import (  # noqa: F401  (re-exported: the public names of the format)
    ADAPTER_REQUIRED_FILES,
    FORMAT,
    FORMAT_VERSION,
    PICKLE_SUFFIXES,
    REQUIRED_FILES,
    TranslatorLoadError,
    _read_config,
    check_entries,
    hash_tree,
    load_component,
    required_files,
    sha256_file,
    verify_tree,
)


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
        self.path: Path | None = None  # the directory it was loaded from
        self._ignore: tuple[str, ...] = ()  # folders verify_tree skips there (a hub download's metadata)
        self.backend = "torch"
        self._routes: dict[tuple[str, str], tuple] = {}  # route() per prompt pair: the task table never changes

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        verify: bool = True, backend: str = "torch", revision: str | None = None,
                        base: str | Path | None = None) -> Translator:
        """Load a translator directory, or a hub repository id ``"org/name"`` (downloaded with
        ``huggingface_hub``, then verified like a local directory). ``backend="onnx"`` runs the generator (and VAE)
        with onnxruntime from the directory's ``onnx/`` files (``ddstrans export --onnx``). ``base``: the teacher
        directory of a translator that keeps its LoRA adapters separate (default: the one it records); its UNet
        must hash as recorded."""
        from diffusers import AutoencoderKL

        from ddstrans.generator import TranslationUNet
        from ddstrans.hub import HUB_METADATA_DIR, is_repo_id, resolve_translator_path
        from ddstrans.tasks import TaskTable

        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        from_hub = is_repo_id(path)
        root = resolve_translator_path(path, revision=revision)
        ignore = (HUB_METADATA_DIR,) if from_hub else ()
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
        adapters = bool(info.get("adapters"))
        if adapters and backend == "onnx":
            raise ValueError("backend='onnx' needs a merged translator (this one keeps its LoRA adapters separate)")
        if verify:
            verify_tree(root, info.get("files", {}), ignore, required=required_files(info))
        elif info.get("files"):
            check_entries(root, info["files"])  # unverified, yet never outside the directory
        listed = info.get("files") or None  # the files to read, by name (verified above unless verify=False)
        if adapters:
            from ddstrans.lora_export import load_adapter_generator

            gen = load_adapter_generator(root, info, base)
        else:
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
        tokenizer = text_encoder = prompt_encoder = None
        family = info.get("teacher", {}).get("family", "sd")
        if info["conditioning"] == "text":
            copied = (root / "text_encoder").is_dir()
            base = root if copied else (Path(ref) if ref else None)
            if base is not None and (base / "text_encoder").is_dir():
                if family == "sd":
                    from transformers import AutoTokenizer, CLIPTextModel

                    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")  # JSON/text files only (verified)
                    text_encoder = load_component(CLIPTextModel, base / "text_encoder", listed if copied else None, base)
                else:
                    from ddstrans.teacher.pipeline import PromptEncoder

                    prompt_encoder = PromptEncoder.from_pretrained(base, family)
        tr = cls(gen, table, info, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, prompt_encoder=prompt_encoder)
        tr.path, tr._ignore = root, ignore
        tr.to(device, dtype)
        if backend == "onnx":
            from ddstrans.onnx_export import OnnxLoadError, use_onnx

            try:
                use_onnx(tr, root, tr.device)
            except OnnxLoadError as e:
                raise TranslatorLoadError(str(e)) from None
        return tr

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Verify this translator's directory again (it may have changed since loading), then upload
        ``translator.json`` and the files it lists to the hub repository ``repo_id`` (created if needed).
        ``kwargs``: ``token``, ``private``, ``revision``, ``commit_message`` (``ddstrans.hub.upload_translator``).
        Returns the commit URL."""
        from ddstrans.hub import upload_translator

        if self.path is None:
            raise ValueError("this Translator was not loaded from a directory; nothing to push")
        meta = self.path / "translator.json"
        if not meta.is_file():
            raise TranslatorLoadError(f"{self.path}: no translator.json (not an exported translator)")
        files = json.loads(meta.read_text()).get("files", {})
        verify_tree(self.path, files, self._ignore, unlisted_ok=True,  # unlisted files are not uploaded
                    required=required_files(self.info))
        return upload_translator(self.path, repo_id, list(files), **kwargs)

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

    def route(self, source: str, target: str) -> list:
        """The passes ``route=True`` makes for a prompt pair: the shortest chain of this translator's caption-rewrite
        tasks from ``source`` to ``target`` (``ddstrans.routes.plan_route``), or the pair itself as one pass when no
        chain reaches it. A list of ``ddstrans.routes.Step``. Planned once per pair: callers that show the route and
        then translate with ``route=True`` (the CLI, the demo page), or translate image by image, share one search."""
        from ddstrans.routes import Step, plan_route

        if (source, target) not in self._routes:
            steps = plan_route(source, target, self.task_table.tasks)
            self._routes[source, target] = tuple([Step("", source, target)] if steps is None else steps)
        return list(self._routes[source, target])

    @torch.no_grad()
    def translate_latents(self, z: torch.Tensor, task: str | None = None, *, source: str | None = None,
                          target: str | None = None, route: bool = False) -> torch.Tensor:
        """One generator forward pass on latents (B, C, h, w). ``route=True`` (text translators, a prompt pair):
        one pass per step of :meth:`route`, each conditioned on that step's prompts: a pair training never
        asked for (two attributes at once, a source and target never together) reached by trained edits."""
        z = z.to(self.device).float()
        if route:
            if source is None or target is None or task is not None:
                raise ValueError("route=True needs source= and target= (not task=)")
            if self.conditioning != "text":
                raise ValueError("route=True needs a text-conditioned translator (this one is task-id conditioned)")
            for step in self.route(source, target):
                z = self.translate_latents(z, source=step.source, target=step.target)
            return z
        ids, src, tgt = self._condition(z.shape[0], task, source, target)
        return self.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt).float()

    @torch.no_grad()
    def translate_tensor(self, x: torch.Tensor, task: str | None = None, *, source=None, target=None,
                         route: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] at the translator's resolution -> translated images in [-1, 1]."""
        return self.decode(self.translate_latents(self.encode(x), task, source=source, target=target, route=route))

    @property
    def size_multiple(self) -> int:
        """Input sizes the generator takes at ``fit="native"``: multiples of the VAE factor times its
        down-sampling (2 per UNet level after the first)."""
        levels = len(self.generator.config.block_out_channels)
        return int(self.info.get("downsample_factor", 1)) * 2 ** (levels - 1)

    def __call__(self, images: Image.Image | Sequence[Image.Image], task: str | None = None, *,
                 source: str | None = None, target: str | None = None, keep_size: bool = True, fit: str = "pad",
                 route: bool = False):
        """Translate PIL image(s), keeping the aspect ratio by default (``fit``: ``pad``, ``crop``, ``resize``,
        ``native``; see ``ddstrans.fitting``). One forward pass per batch (per distinct size at ``native``; per
        step of the route with ``route=True``, see :meth:`translate_latents`).
        ``keep_size``: put outputs back at each input's size (else the network's outputs as they are).
        Returns a list (or one image for one input)."""
        from ddstrans.fitting import fit_image, restore_image
        from ddstrans.images import pil_to_tensor, tensor_to_pil, to_rgb

        single = isinstance(images, Image.Image)
        ims = [images] if single else list(images)
        if not ims:
            return []
        if fit == "native" and self.backend == "onnx" and not self.info.get("onnx", {}).get("dynamic_size", True):
            raise ValueError("fit='native' needs a generator exported with dynamic sizes (this one has position "
                             "features, traced at the training size)")
        fitted = [fit_image(to_rgb(im), fit, self.resolution, self.size_multiple) for im in ims]
        out: list = [None] * len(ims)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (x, _) in enumerate(fitted):
            groups.setdefault(x.size, []).append(i)
        for idx in groups.values():
            x = pil_to_tensor([fitted[i][0] for i in idx])
            for i, o in zip(idx, tensor_to_pil(self.translate_tensor(x, task, source=source, target=target,
                                                                   route=route))):
                out[i] = restore_image(o, fitted[i][1]) if keep_size else o
        return out[0] if single else out
