"""Structure kept from the input: DINO self-similarity distance, LPIPS, and PSNR/SSIM of the background.

``DinoStructureDistance`` (Tumanyan et al., Splice, CVPR 2022; the "DINO Struct. Dist." of img2img-turbo,
Parmar et al. 2024): the keys of the last ViT block's self-attention, all heads concatenated, give each token
(CLS and patches) a descriptor; their pairwise cosine similarities form a self-similarity matrix, which describes
the image's layout but not its appearance. The distance is the mean squared difference between the matrices of
output and input, per image (0 for identical images). The reference setting is DINO ViT-B/8 (``facebook/dino-vitb8``)
with the shorter side resized to 224 and ImageNet normalisation; the image is resized to the model's
``image_size`` here, so a tiny test model works the same way.

``LPIPS`` (Zhang et al. 2018) through torchmetrics, which builds its backbones from torchvision: it is offered
only when torchvision imports (``lpips_available()``); otherwise the DINO distance is the structure metric.

``BackgroundPSNR`` / ``BackgroundSSIM``: where a mask marks the region an edit may change (1 = editable), the
PSNR and the mean SSIM (torchmetrics' SSIM map, Gaussian window 11, sigma 1.5) over the pixels outside it, in
[0, 1] units. PSNR is capped at 100 dB (an untouched background), so means and intervals stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddstrans.metrics.base import MetricUnavailable, PerImageMetric, to_unit
from ddstrans.metrics.models import Normalizer, last_key_projection, load_vit

PSNR_FLOOR_MSE = 1e-10  # 100 dB
LPIPS_UNAVAILABLE = ("lpips needs torchvision (torchmetrics' and the lpips package's backbones are torchvision "
                     "models), which is not installed beside this torch; use dino_structure for structure")


class DinoStructureDistance(PerImageMetric):
    """MSE between the last-layer key self-similarity matrices of output and input (lower: structure kept)."""

    needs = ("inputs", "outputs")
    higher_is_better = False

    def __init__(self, dino, **kwargs):
        super().__init__(**kwargs)
        model, prep = (dino if isinstance(dino, tuple) else load_vit(str(dino)))
        self.vit = model
        self.size = int(prep["size"])
        self.normalize = Normalizer(prep["mean"], prep["std"])
        self._keys = last_key_projection(model)

    @torch.no_grad()
    def self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, N) cosine similarities of the last block's keys (N tokens: CLS, registers if any, patches)."""
        x = to_unit(images.to(self.normalize.mean.device))
        h, w = x.shape[-2:]
        if min(h, w) != self.size:  # shorter side to the model's size, as torchvision's Resize(224)
            s = self.size / min(h, w)
            x = F.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))), mode="bilinear",
                              antialias=True, align_corners=False)
        captured = []
        handle = self._keys.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            kw = {"interpolate_pos_encoding": True} if x.shape[-2:] != (self.size, self.size) and \
                self.vit.config.model_type == "vit" else {}
            self.vit(pixel_values=self.normalize(x), **kw)
        finally:
            handle.remove()
        keys = F.normalize(captured[-1].float(), dim=-1)  # (B, N, heads * head_dim)
        return keys @ keys.transpose(1, 2)

    def score(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        a, b = self.self_similarity(inputs), self.self_similarity(outputs)
        return (a - b).pow(2).flatten(1).mean(1)


def lpips_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken beside this torch
        return False
    return True


class LPIPS(PerImageMetric):
    """LPIPS to the input through torchmetrics (needs torchvision; raises ``MetricUnavailable`` otherwise)."""

    needs = ("inputs", "outputs")
    higher_is_better = False

    def __init__(self, net_type: str = "alex", **kwargs):
        if not lpips_available():
            raise MetricUnavailable(LPIPS_UNAVAILABLE)
        super().__init__(**kwargs)
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none", normalize=False)

    @torch.no_grad()
    def score(self, inputs, outputs):
        self.lpips.reset()
        return self.lpips.net(outputs.float().clamp(-1, 1), inputs.float().clamp(-1, 1)).flatten()


def _background(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    m = masks.to(like.device).float()
    if m.dim() == 3:
        m = m[:, None]
    if m.shape[-2:] != like.shape[-2:]:
        m = F.interpolate(m, size=like.shape[-2:], mode="nearest")
    return (m < 0.5).float().expand_as(like)


class BackgroundPSNR(PerImageMetric):
    """PSNR (dB, [0, 1] units) of the output against the input over the pixels outside the mask."""

    needs = ("inputs", "outputs", "masks")
    higher_is_better = True

    def score(self, inputs, outputs, masks):
        x, y = to_unit(inputs), to_unit(outputs.to(inputs.device))
        bg = _background(masks, x)
        n = bg.flatten(1).sum(1)
        mse = ((x - y).pow(2) * bg).flatten(1).sum(1) / n.clamp(min=1)
        psnr = 10 * torch.log10(1.0 / mse.clamp(min=PSNR_FLOOR_MSE))  # an untouched background: the cap
        return torch.where(n > 0, psnr, torch.full_like(psnr, math.nan))


class BackgroundSSIM(PerImageMetric):
    """Mean SSIM over the pixels outside the mask (torchmetrics' SSIM map)."""

    needs = ("inputs", "outputs", "masks")
    higher_is_better = True

    def score(self, inputs, outputs, masks):
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        x, y = to_unit(inputs), to_unit(outputs.to(inputs.device))
        _, full = ssim(y, x, data_range=1.0, reduction="none", return_full_image=True)
        bg = _background(masks, full)
        n = bg.flatten(1).sum(1)
        v = (full * bg).flatten(1).sum(1) / n.clamp(min=1)
        return torch.where(n > 0, v, torch.full_like(v, math.nan))
