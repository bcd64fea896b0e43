"""The translator directory's files: format constants, the sha256 file list, and loading one component safely.

Kept apart from ``ddstrans.translator`` so that the code folding LoRA adapters into a base
(``ddstrans.lora_export``) and the export can use the same checks without importing the ``Translator`` class
that calls them.

Only JSON, text and safetensors are read, and only files listed in ``translator.json``: the directory must hold
exactly the listed files, every listed path must stay inside it, and every file's sha256 is checked before use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

FORMAT = "ddstrans.translator"
FORMAT_VERSION = 2  # 2: keep-adapters translators; merged ones are still written as version 1 (older readers)
REQUIRED_FILES = ("generator/config.json", "generator/diffusion_pytorch_model.safetensors", "tasks.safetensors")
ADAPTER_REQUIRED_FILES = ("generator/config.json", "generator/adapters.safetensors", "tasks.safetensors")
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


def verify_tree(root: Path, files: dict[str, str], ignore: Sequence[str] = (), *, unlisted_ok: bool = False,
                required: Sequence[str] = REQUIRED_FILES) -> None:
    """Raise ``TranslatorLoadError`` unless the directory holds exactly the listed files (plus translator.json),
    each with its hash. Entry paths are checked first (``check_entries``), unlisted files next (a loader must
    never find an unverified file, e.g. a ``*.safetensors.index.json`` pointing at other weights), hashes last.
    ``ignore``: folders (relative paths) no loader reads, skipped by the unlisted-file check (a hub download's
    metadata folder, ``ddstrans.hub.HUB_METADATA_DIR``); a listed entry inside one is refused. ``unlisted_ok``:
    only for a reader of the listed files alone (``push_to_hub`` uploads nothing else), never for a loader."""
    if not isinstance(files, dict) or not files:
        raise TranslatorLoadError(f"{root}: translator.json lists no file hashes; refusing to load unverified files "
                                  "(re-export it with `ddstrans export`)")
    check_entries(root, files)
    ignored = tuple(d.rstrip("/") + "/" for d in ignore)
    inside = [r for r in files if r.startswith(ignored)] if ignored else []
    if inside:
        raise TranslatorLoadError(f"{root}: translator.json lists {inside[0]}, inside the download metadata folder; "
                                  "refusing to load")
    unlisted = [r for r in required if r not in files]
    if unlisted:
        raise TranslatorLoadError(f"{root}: translator.json does not list {', '.join(unlisted)}; refusing to load")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if ignored and (rel + "/").startswith(ignored) and not p.is_symlink():
            continue
        if p.is_symlink():
            raise TranslatorLoadError(f"{root}: {rel} is a symbolic link; refusing to load")
        if p.is_file() and rel not in files and rel != "translator.json" and not unlisted_ok:
            raise TranslatorLoadError(f"{root}: unexpected file {rel} (not in translator.json); refusing to load")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise TranslatorLoadError(f"{root}: file {rel} listed in translator.json is missing")
        if sha256_file(p) != digest:
            raise TranslatorLoadError(
                f"{root}: {rel} does not match its sha256 in translator.json (tampered, truncated or corrupted); refusing to load")


def required_files(info: dict) -> tuple[str, ...]:
    """The files every translator of this kind lists (a keep-adapters one has adapters instead of weights)."""
    return ADAPTER_REQUIRED_FILES if info.get("adapters") else REQUIRED_FILES


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
