"""Which family a teacher directory holds, and loading it: every component checked before any weight is read, so a
directory either loads whole or not at all, with one line saying why.

The family comes from ``model_index.json``'s pipeline class; a directory without it (written component by
component) is recognised from its denoiser's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ddstrans.teacher.base import TeacherLoadError, default_cache_dir, fingerprint, first_line

# pipeline classes of model_index.json -> family
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}
SUPPORTED = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), "
             "SD3/SD3.5 (StableDiffusion3Pipeline), Flux (FluxPipeline)")
# components each family needs (SD3's T5 text_encoder_3/tokenizer_3 is optional: absent -> zeros, as diffusers)
REQUIRED = {
    "sd": ("unet", "scheduler", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"),
    "sd3": ("transformer", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"),
    "flux": ("transformer", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"),
}
REQUIRED_COMPONENTS = REQUIRED["sd"]  # the SD 1.x/2.x layout (kept for callers that check it)
ALL_COMPONENTS = ("unet", "transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve(path_or_hub_id: str | os.PathLike) -> tuple[Path, str]:
    """A local directory holding the components, and a stable identity string for caching."""
    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve(), str(local.resolve())
    if local.exists():
        raise TeacherLoadError(f"teacher path {name!r} is a file; expected a diffusers-format directory")
    if not _looks_like_hub_id(name):
        raise TeacherLoadError(f"teacher directory {name!r} does not exist (and it is not a hub id like 'org/model')")
    try:
        from huggingface_hub import snapshot_download

        allow = [f"{c}/*" for c in ALL_COMPONENTS] + ["model_index.json"]
        return Path(snapshot_download(name, allow_patterns=allow)), f"hub:{name}"
    except Exception as e:  # noqa: BLE001 - network/auth errors come in many types
        raise TeacherLoadError(f"could not fetch teacher {name!r} from the hub: {first_line(e)}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherLoadError(f"cannot read {str(path)!r}: {first_line(e)}") from None


def _is_diffusers_pipeline(name) -> bool:
    """A pipeline class diffusers knows (video, upscaler, inpainting, ...), by name: other families' directories."""
    if not isinstance(name, str) or not name.endswith("Pipeline"):
        return False
    import diffusers

    return hasattr(diffusers, name)


def detect_family(root: Path) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux``; ``TeacherLoadError`` naming the supported families otherwise."""
    index = root / "model_index.json"
    if index.is_file():
        cls = _read_json(index).get("_class_name")
        if cls in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls]
        if _is_diffusers_pipeline(cls):
            raise TeacherLoadError(f"teacher {str(root)!r} is a {cls} (model_index.json); supported families: "
                                   f"{SUPPORTED}")
        # a class of its own (e.g. a teacher trained in this project): recognised from its components below
    if (root / "transformer" / "config.json").is_file():
        cls = _read_json(root / "transformer" / "config.json").get("_class_name")
        fam = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(cls)
        if fam is None:
            raise TeacherLoadError(f"teacher {str(root)!r} has a {cls} transformer; supported families: {SUPPORTED}")
        return fam
    if (root / "unet" / "config.json").is_file():
        return "sdxl" if _read_json(root / "unet" / "config.json").get("addition_embed_type") == "text_time" else "sd"
    return "sd"  # no index, no denoiser: reported as missing components of the SD layout


def missing_components(root: Path, family: str) -> list[str]:
    index = root / "model_index.json"
    declared = _read_json(index) if index.is_file() else {}
    missing = [c for c in REQUIRED[family] if not (root / c).is_dir()]
    if family == "sd3":  # T5 is optional, but a declared one must be there
        for c in ("text_encoder_3", "tokenizer_3"):
            entry = declared.get(c)
            if isinstance(entry, list) and entry[0] is not None and not (root / c).is_dir():
                missing.append(c)
    return missing


def check_directory(root: Path) -> tuple[str, list[str]]:
    """``(family, missing components)`` of a local teacher directory (no weights read)."""
    family = detect_family(root)
    return family, missing_components(root, family)


def load_teacher(path_or_hub_id, *, torch_dtype=None, device=None, cache_dir=None, variant=None, sd_class=None):
    """Load and freeze the teacher of ``path_or_hub_id`` with the adapter of its family."""
    root, identity = resolve(path_or_hub_id)
    family, missing = check_directory(root)
    if missing:
        raise TeacherLoadError(
            f"teacher directory {str(root)!r} ({family}) lacks component(s) {', '.join(missing)}; "
            f"expected subfolders {', '.join(REQUIRED[family])}" + (" (and optional vae)" if family == "sd" else ""))
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if variant is not None:
        kw["variant"] = variant
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if family == "sd":
        from ddstrans.teacher.sd import Teacher

        teacher = _load_sd(sd_class or Teacher, root, identity, cache, kw)
    else:
        from ddstrans.teacher.pipeline import PIPELINE_TEACHERS

        teacher = PIPELINE_TEACHERS[family].load(root, identity, cache, kw)
    teacher.source = str(path_or_hub_id)
    teacher.root = root
    if device is not None:
        teacher.to(device)
    return teacher


def load_component(root: Path, what: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many types
        raise TeacherLoadError(f"cannot load teacher component {what!r} from {str(root / what)!r}: {first_line(e)}") from None


def _load_sd(cls, root: Path, identity: str, cache: Path, kw: dict):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = load_component(root, "unet", lambda: UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw))
    scheduler = load_component(root, "scheduler", lambda: DDPMScheduler.from_pretrained(root, subfolder="scheduler"))
    text_encoder = load_component(root, "text_encoder",
                                  lambda: CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw))
    tokenizer = load_component(root, "tokenizer", lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
    vae = None
    if (root / "vae").is_dir():
        vae = load_component(root, "vae", lambda: AutoencoderKL.from_pretrained(root, subfolder="vae", **kw))
    return cls(unet, scheduler, text_encoder, tokenizer, vae, identity=fingerprint(root, identity), cache_dir=cache)
