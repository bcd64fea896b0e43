"""Translators that keep the LoRA adapters separate, with the teacher's UNet referenced by location and hash.

Why: a merged LoRA translator carries the whole UNet (SD 1.5: 3.4 GB in float32) although only the adapters, the
``conv_out`` twin and the task tokens were trained. A user who already holds the teacher needs only those tensors
(``export_checkpoint(..., merge_adapters=False)``, ``ddstrans export --keep-adapters``). The translator then records
where the base came from (its directory and, for a hub teacher, its hub id) and a content hash of the base UNet's
weights, so that loading it on other weights (another checkpoint or a fine-tune saved under the same name) is
refused instead of translating with adapters that were trained for a different network.

The hash (:func:`unet_sha256`) is sha256 over the UNet's state dict as loaded in float32: every tensor's name,
shape and bytes, in sorted name order. Hashing tensors instead of files makes it independent of how the weights
are stored (one file or shards, safetensors header order and metadata, a re-save), and costs one pass over weights
the loader reads anyway (SD 1.5: 4.5 s on one CPU core, docs/scale.md). It is computed in float32 because that is
what the adapters are folded into.

Loading folds the adapters into the base with PEFT's ``merge`` (in place: one copy of the UNet) and returns the same
``TranslationUNet`` a merged export holds, so inference, ONNX-free serving and the outputs are those of the merged
translator (to float tolerance).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ddstrans.translator_files import TranslatorLoadError, _read_config, load_component

ADAPTERS_FILE = "generator/adapters.safetensors"
CONFIG_FILE = "generator/config.json"
HASH_SCHEME = "sha256 of the float32 state dict (name, shape, bytes; sorted names)"


class BaseTeacherError(TranslatorLoadError):
    """The base teacher of a keep-adapters translator is missing or not the one its adapters were trained on."""


def unet_sha256(unet: torch.nn.Module) -> str:
    """Content hash of a plain (adapter-free) denoiser's weights; see the module docstring for why tensors."""
    h = hashlib.sha256()
    sd = unet.state_dict()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def base_reference(root: Path, source: str | None, sha256: str) -> dict:
    """The ``adapters.base`` entry of translator.json: where to find the base and what its weights must hash to."""
    hub = source[len("hub:"):] if isinstance(source, str) and source.startswith("hub:") else None
    return {"path": str(Path(root).resolve()), "hub_id": hub, "unet_sha256": sha256, "hash": HASH_SCHEME}


def write_adapters(gen, out: Path) -> None:
    """``generator/config.json`` (the LoRA generator's config) and ``generator/adapters.safetensors`` (its trained
    tensors only, float32) under ``out``."""
    from safetensors.torch import save_file

    (out / "generator").mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": type(gen).__name__, **{k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in gen.config.items()}}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().float().contiguous() for k, v in gen.state_dict().items()}, str(out / ADAPTERS_FILE))


def resolve_base(ref: dict, base: str | Path | None) -> Path:
    """The base teacher's directory: ``base`` when given, else the recorded directory, else the recorded hub id
    (downloading its ``unet/`` only)."""
    if base is not None:
        p = Path(base).expanduser()
        if not (p / "unet").is_dir():
            raise BaseTeacherError(f"base={str(base)!r} has no unet/ folder: give the teacher's diffusers directory")
        return p
    path, hub = ref.get("path"), ref.get("hub_id")
    if path and (Path(path) / "unet").is_dir():
        return Path(path)
    if hub:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(hub, allow_patterns=["unet/*.json", "unet/*.safetensors"]))
        except Exception as e:  # noqa: BLE001 - network/auth errors come in many types
            raise BaseTeacherError(f"the base teacher {hub!r} could not be fetched from the hub "
                                   f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                                   "give base, its diffusers directory") from None
    raise BaseTeacherError(f"this translator keeps its LoRA adapters separate and its base teacher is not at "
                           f"{path!r} (no unet/ there): give base, the teacher's diffusers directory")


def load_adapter_generator(root: Path, info: dict, base: str | Path | None = None):
    """The ``TranslationUNet`` of a keep-adapters translator at ``root``: the base UNet (checked against its
    recorded hash) with the adapters of ``generator/adapters.safetensors`` folded in."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ddstrans.lora import lora_generator_from_config, merge_to_translation_unet

    ref = info.get("adapters", {}).get("base") or {}
    if not ref.get("unet_sha256"):
        raise TranslatorLoadError(f"{root}: translator.json records no base hash (adapters.base.unet_sha256)")
    base_dir = resolve_base(ref, base)
    unet = load_component(UNet2DConditionModel, base_dir / "unet", None, base_dir).float()
    got = unet_sha256(unet)
    if got != ref["unet_sha256"]:
        raise BaseTeacherError(f"base={str(base_dir)!r}: its UNet weights hash to {got[:16]}…, the adapters were "
                               f"trained on {ref['unet_sha256'][:16]}… ({ref.get('path')}); give the matching base")
    cfg = _read_config(root / CONFIG_FILE)
    try:
        state = load_file(str(root / ADAPTERS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad headers
        raise TranslatorLoadError(f"{root}: cannot read {ADAPTERS_FILE} ({str(e).splitlines()[0] if str(e) else e!r})") from None
    try:
        gen = lora_generator_from_config(unet, cfg)
        gen.load_state_dict(state, strict=True)
        return merge_to_translation_unet(gen, in_place=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise TranslatorLoadError(f"{root}: the adapters do not fit the base ({str(e).strip().splitlines()[0]})") from None
