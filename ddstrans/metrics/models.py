"""Loading the models that metrics measure with: CLIP, a DINO/DINOv2 ViT, and a feature network for FID/KID.

Each loader takes a local directory or a hub id and checks the model's *kind* before loading it, so a DINO
directory passed where CLIP is expected fails with one line instead of a shape error deep inside a forward.
Errors are ``MetricModelError`` (a ``ValueError``) naming the parameter; the CLI maps parameters to flags.

Preprocessing happens in torch on the metric's device (resize, crop, normalise with the model's own
``preprocessor_config.json`` values), batched: image processors of ``transformers`` work per image through
PIL and, in this environment, their default backend needs torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_TYPES = ("vit", "dino", "dinov2", "dinov2_with_registers", "dinov3_vit")


class MetricModelError(ValueError):
    """A metric model that is missing or of the wrong kind (one line, naming the parameter)."""


def _config(path: str, param: str) -> dict:
    """The model's ``config.json`` (local directory or hub id)."""
    local = Path(str(path)).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise MetricModelError(f"{param}={path}: no config.json there (expected a transformers model directory)")
        return json.loads((local / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception as e:  # noqa: BLE001 - offline hub, unknown id, ...
        raise MetricModelError(f"{param}={path}: not a local directory and not loadable from the hub "
                               f"({type(e).__name__})") from None


def _preprocessor(path: str) -> dict:
    try:
        from transformers.image_processing_base import ImageProcessingMixin

        return ImageProcessingMixin.get_image_processor_dict(str(path))[0]
    except Exception:  # noqa: BLE001 - a model saved without its preprocessor config: library defaults
        return {}


def _size(value, default: int) -> int:
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return int(value or default)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (bicubic, antialiased) so that the shorter side is ``size``."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    s = size / min(h, w)
    return F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                         antialias=True, align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + size, left : left + size]


class Normalizer(torch.nn.Module):
    """[0, 1] images -> (x - mean) / std with per-channel buffers (they move with ``.to(device)``)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------------- CLIP
def load_clip(path: str, param: str = "clip"):
    """``(model, tokenizer, preprocessing dict)`` of a CLIP model (``CLIPModel``: both towers)."""
    cfg = _config(path, param)
    if cfg.get("model_type") != "clip":
        raise MetricModelError(f"{param}={path}: a {cfg.get('model_type')!r} model, not CLIP (model_type 'clip' with "
                               "text and vision towers, e.g. openai/clip-vit-large-patch14)")
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(path)).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    pre = _preprocessor(path)
    vision = model.config.vision_config.image_size
    prep = {"size": _size(pre.get("size"), vision), "crop": _size(pre.get("crop_size"), vision),
            "mean": tuple(pre.get("image_mean") or (0.48145466, 0.4578275, 0.40821073)),
            "std": tuple(pre.get("image_std") or (0.26862954, 0.26130258, 0.27577711))}
    return model, tokenizer, prep


# ---------------------------------------------------------------------------------------------- DINO / ViT
def load_vit(path: str, param: str = "dino"):
    """``(model, preprocessing dict)`` of a ViT image encoder (DINO as ``ViTModel``, DINOv2 ...)."""
    cfg = _config(path, param)
    kind = cfg.get("model_type")
    if kind not in VIT_TYPES:
        raise MetricModelError(f"{param}={path}: a {kind!r} model, not a ViT (DINO ViT e.g. facebook/dino-vitb8, "
                               f"or DINOv2 e.g. facebook/dinov2-base; model_type one of {', '.join(VIT_TYPES)})")
    from transformers import AutoModel

    kw = {"add_pooling_layer": False} if kind == "vit" else {}
    model = AutoModel.from_pretrained(str(path), **kw).eval().requires_grad_(False)
    pre = _preprocessor(path)
    size = int(getattr(model.config, "image_size", 224))
    prep = {"size": size, "mean": tuple(pre.get("image_mean") or IMAGENET_MEAN),
            "std": tuple(pre.get("image_std") or IMAGENET_STD)}
    return model, prep


def last_key_projection(model) -> torch.nn.Module:
    """The key projection of the last transformer block (``k_proj``, or ``key`` in older transformers)."""
    keys = [m for n, m in model.named_modules() if n.endswith(("k_proj", ".key")) and isinstance(m, torch.nn.Linear)]
    if not keys:
        raise MetricModelError(f"{type(model).__name__}: found no attention key projection to read")
    return keys[-1]
