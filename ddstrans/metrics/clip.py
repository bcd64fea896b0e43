"""CLIP similarity to the target prompt, and directional CLIP similarity.

``CLIPTargetScore``: the CLIP score of Hessel et al. (2021) as torchmetrics' ``CLIPScore`` reports it,
``100 * max(cos(E_I(output), E_T(target prompt)), 0)``. torchmetrics' own class is not used because its
processor wrapper imports torchvision, which does not install beside this project's torch.

``DirectionalCLIPSimilarity``: ``cos(E_I(output) - E_I(input), E_T(target) - E_T(source))`` with L2-normalised
embeddings, as in StyleGAN-NADA (Gal et al. 2021) and InstructPix2Pix's ``ClipSimilarity.sim_direction``
(Brooks et al. 2023). It says whether the image moved the way the prompt moved. When the image did not change
(``E_I(output) == E_I(input)``, e.g. the identity method) or the prompts are the same, the direction is
undefined: the image is counted in ``undefined`` and left out of the mean (never a NaN in it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddstrans.metrics.base import PerImageMetric, to_unit
from ddstrans.metrics.models import Normalizer, center_crop, load_clip, resize_short_side

UNDEFINED_NORM = 1e-6  # a direction shorter than this (embeddings have norm 1) has no direction


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder(torch.nn.Module):
    """L2-normalised CLIP image and text embeddings, batched on the module's device (text ones cached)."""

    def __init__(self, model, tokenizer, prep: dict):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop = int(prep["size"]), int(prep["crop"])
        self.normalize = Normalizer(prep["mean"], prep["std"])
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, param: str = "clip") -> ClipEmbedder:
        return cls(*load_clip(path, param))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        x = center_crop(resize_short_side(to_unit(images.to(self.device)), self.size), self.crop)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=self.normalize(x))).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self._text_cache})
        if new:
            tok = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").to(self.device)
            emb = F.normalize(_pooled(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                   attention_mask=tok["attention_mask"])).float(), dim=-1)
            self._text_cache.update(zip(new, emb))
        return torch.stack([self._text_cache[p].to(self.device) for p in prompts])

    def _apply(self, fn, *args, **kwargs):
        self._text_cache = {}  # cached embeddings live on the old device
        return super()._apply(fn, *args, **kwargs)


def _embedder(clip) -> ClipEmbedder:
    return clip if isinstance(clip, ClipEmbedder) else ClipEmbedder.from_pretrained(str(clip))


class CLIPTargetScore(PerImageMetric):
    """``100 * max(cos(output, target prompt), 0)`` per image (higher: closer to the target prompt)."""

    needs = ("outputs", "target_prompts")
    higher_is_better = True

    def __init__(self, clip, **kwargs):
        super().__init__(**kwargs)
        self.embedder = _embedder(clip)

    def score(self, outputs: torch.Tensor, target_prompts: list[str]) -> torch.Tensor:
        cos = (self.embedder.embed_images(outputs) * self.embedder.embed_texts(list(target_prompts))).sum(-1)
        return 100 * cos.clamp(min=0)


class DirectionalCLIPSimilarity(PerImageMetric):
    """Cosine between the image-embedding change and the text-embedding change (in [-1, 1]; undefined when
    either change is zero)."""

    needs = ("inputs", "outputs", "source_prompts", "target_prompts")
    higher_is_better = True

    def __init__(self, clip, **kwargs):
        super().__init__(**kwargs)
        self.embedder = _embedder(clip)

    def score(self, inputs, outputs, source_prompts, target_prompts) -> torch.Tensor:
        e = self.embedder
        d_img = e.embed_images(outputs) - e.embed_images(inputs)
        d_txt = e.embed_texts(list(target_prompts)) - e.embed_texts(list(source_prompts))
        cos = F.cosine_similarity(d_img, d_txt, dim=-1)
        undefined = (d_img.norm(dim=-1) <= UNDEFINED_NORM) | (d_txt.norm(dim=-1) <= UNDEFINED_NORM)
        return torch.where(undefined, torch.full_like(cos, float("nan")), cos)
