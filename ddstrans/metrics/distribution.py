"""FID and KID of outputs against target-domain images, with a feature network from a local path.

torchmetrics computes both (``FrechetInceptionDistance``, ``KernelInceptionDistance``); its default Inception
comes from torch-fidelity, whose package imports torchvision, so the feature network is given instead
(torchmetrics accepts any ``nn.Module`` as ``feature``):

- a **TorchScript file**: the FID Inception of TensorFlow's 2015-12-05 graph as StyleGAN2-ADA and clean-fid ship
  it (``inception-2015-12-05.pt``), called as ``net(x, return_features=True)`` on images in [0, 255] at
  299 x 299 — the standard FID; or any scripted network with that call (or ``net(x)``) returning ``(B, d)``;
- a **transformers directory or hub id** of an image encoder (CLIP's vision tower, DINOv2, ViT): its pooled
  embedding, the "FD_DINOv2" family of Stein et al. (2023). Such numbers are not comparable with Inception FIDs.

Real-image features are kept across ``reset()`` (``reset_real_features=False``): the target set is encoded once
and each method's outputs are compared with it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddstrans.metrics.base import to_unit
from ddstrans.metrics.models import MetricModelError, Normalizer, _preprocessor


class FeatureNetwork(torch.nn.Module):
    """Images in [-1, 1] -> (B, d) features of a TorchScript or transformers network (see the module doc)."""

    def __init__(self, net, kind: str, size: int, mean=None, std=None):
        super().__init__()
        self.net, self.kind, self.size = net, kind, int(size)
        self.normalize = Normalizer(mean, std) if mean is not None else None
        self.return_features = kind == "torchscript" and _accepts(net, "return_features")
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(2, 3, self.size, self.size)).shape[-1])

    @classmethod
    def from_path(cls, path: str, param: str = "fid_features") -> FeatureNetwork:
        p = Path(str(path)).expanduser()
        if p.is_file():
            try:
                net = torch.jit.load(str(p), map_location="cpu")
            except Exception as e:  # noqa: BLE001 - not a TorchScript archive
                raise MetricModelError(f"{param}={path}: not a TorchScript feature network ({type(e).__name__}); "
                                       "give inception-2015-12-05.pt or a transformers image-encoder directory") from None
            return cls(net.eval(), "torchscript", 299)
        from ddstrans.metrics.models import _config

        cfg = _config(str(path), param)
        kind = cfg.get("model_type")
        from transformers import AutoModel, CLIPModel

        if kind == "clip":
            net = CLIPModel.from_pretrained(str(path))
            size = net.config.vision_config.image_size
        elif kind in ("clip_vision_model", "vit", "dinov2", "dinov2_with_registers", "siglip_vision_model"):
            net = AutoModel.from_pretrained(str(path))
            size = getattr(net.config, "image_size", 224)
        else:
            raise MetricModelError(f"{param}={path}: a {kind!r} model is not an image encoder for FID/KID features "
                                   "(give the TorchScript Inception, or a CLIP/DINOv2/ViT directory)")
        pre = _preprocessor(str(path))
        mean = tuple(pre.get("image_mean") or (0.485, 0.456, 0.406))
        std = tuple(pre.get("image_std") or (0.229, 0.224, 0.225))
        return cls(net.eval().requires_grad_(False), kind, int(size), mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.kind == "torchscript":
            x = x * 255
            out = self.net(x, return_features=True) if self.return_features else self.net(x)
        elif self.kind == "clip":
            out = self.net.get_image_features(pixel_values=self.normalize(x))
        else:
            out = self.net(pixel_values=self.normalize(x))
        if not isinstance(out, torch.Tensor):
            pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out.last_hidden_state[:, 0]
        return out.float().flatten(1)


def _accepts(net, name: str) -> bool:
    try:
        return any(a.name == name for a in net.forward.schema.arguments)
    except AttributeError:
        return name in inspect.signature(net.forward).parameters


def _features(feature) -> FeatureNetwork:
    return feature if isinstance(feature, torch.nn.Module) else FeatureNetwork.from_path(str(feature))


class _TargetDomain:
    """Target-domain images are added once and kept across ``reset()``; outputs come from the eval batch."""

    needs = ("outputs",)

    def add_real(self, images: torch.Tensor) -> None:
        self.update(images, real=True)

    def clear_real(self) -> None:
        """Forget the target images too (the next task has another target domain)."""
        self.reset_real_features = True
        self.reset()
        self.reset_real_features = False

    def update_from(self, batch: dict) -> None:
        self.update(batch["outputs"], real=False)


class FID(_TargetDomain, FrechetInceptionDistance):
    """torchmetrics FID on a given feature network; ``update_from`` adds outputs, ``add_real`` target images."""

    def __init__(self, feature, **kwargs):
        super().__init__(feature=_features(feature), reset_real_features=False, **kwargs)

    def compute(self) -> torch.Tensor:
        if int(self.real_features_num_samples) < 2 or int(self.fake_features_num_samples) < 2:
            raise ValueError(f"fid needs at least 2 target and 2 output images, got "
                             f"{int(self.real_features_num_samples)} and {int(self.fake_features_num_samples)}")
        return super().compute()


class KID(_TargetDomain, KernelInceptionDistance):
    """torchmetrics KID (mean, std over subsets); the subset size shrinks to the smaller of the two sets."""

    def __init__(self, feature, subsets: int = 100, subset_size: int = 1000, **kwargs):
        import warnings

        with warnings.catch_warnings():  # "will save all extracted features": that is how KID works
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=_features(feature), subsets=subsets, subset_size=subset_size,
                             reset_real_features=False, **kwargs)
        self.max_subset_size = int(subset_size)

    def compute(self):
        n = min(sum(len(f) for f in self.real_features), sum(len(f) for f in self.fake_features))
        if n < 2:
            raise ValueError(f"kid needs at least 2 target and 2 output images, got {n}")
        self.subset_size = min(self.max_subset_size, n)
        return super().compute()


def describe(path) -> str:
    """One line naming the feature network (for reports)."""
    p = Path(str(path))
    if p.is_file():
        return f"TorchScript {p.name}"
    cfg = p / "config.json"
    return f"{json.loads(cfg.read_text()).get('model_type')} {p.name}" if cfg.is_file() else str(path)
