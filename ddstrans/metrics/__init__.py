"""Image-editing metrics in the torchmetrics style (see ``docs/evaluation.md`` for definitions and sources).

    from ddstrans.metrics import build_metrics
    metrics = build_metrics(["clip_target", "clip_direction", "dino_structure"], clip="openai/clip-vit-large-patch14",
                            dino="facebook/dino-vitb8")
    for m in metrics.values():
        m.update_from({"inputs": x, "outputs": y, "source_prompts": s, "target_prompts": t})

Per-image metrics (``PerImageMetric``) report a mean with a 95% interval; ``fid`` and ``kid`` are set-level.
"""

from __future__ import annotations

from ddstrans.metrics.base import BATCH_FIELDS, MetricUnavailable, PerImageMetric
from ddstrans.metrics.models import MetricModelError
from ddstrans.metrics.stats import mean_ci

# name -> (what provides it, the value's direction, a short label)
METRICS = {
    "clip_target": ("clip", True, "CLIP score to target (100 max(cos, 0))"),
    "clip_direction": ("clip", True, "directional CLIP similarity"),
    "dino_structure": ("dino", False, "DINO self-similarity structure distance"),
    "lpips": (None, False, "LPIPS to input"),
    "psnr_background": ("masks", True, "PSNR outside the mask (dB)"),
    "ssim_background": ("masks", True, "SSIM outside the mask"),
    "fid": ("fid_features", False, "FID to target images"),
    "kid": ("fid_features", False, "KID to target images"),
}
SET_LEVEL = ("fid", "kid")
WHAT = {"clip": "a CLIP model (local directory or hub id)", "dino": "a DINO/DINOv2 ViT (local directory or hub id)",
        "masks": "edit masks (1 = region the edit may change)",
        "fid_features": "a feature network (TorchScript Inception file or image-encoder directory)",
        "targets": "target-domain images"}


def available_metrics(*, clip=None, dino=None, fid_features=None, masks: bool = False, targets: bool = False) -> list[str]:
    """Every metric whose requirements are given (lpips only where torchvision imports)."""
    from ddstrans.metrics.structure import lpips_available

    given = {"clip": clip is not None, "dino": dino is not None, "masks": masks,
             "fid_features": fid_features is not None and targets, None: lpips_available()}
    return [name for name, (need, _, _) in METRICS.items() if given[need]]


def build_metrics(names, *, clip=None, dino=None, fid_features=None, masks: bool = False, targets: bool = False,
                  kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """Metric objects by name; a metric whose model or data is missing raises one ``MetricUnavailable`` line
    naming the parameter that provides it. One CLIP model is shared by the two CLIP metrics."""
    from ddstrans.metrics import clip as C
    from ddstrans.metrics import distribution as D
    from ddstrans.metrics import structure as S

    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricUnavailable(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}", "metrics")
    given = {"clip": clip, "dino": dino, "fid_features": fid_features, "masks": masks or None}
    for n in names:
        need = METRICS[n][0]
        if need is not None and given[need] is None:
            raise MetricUnavailable(f"metric {n} needs {need}: {WHAT[need]}", need)
        if n in SET_LEVEL and not targets:
            raise MetricUnavailable(f"metric {n} needs targets: {WHAT['targets']}", "targets")
    out, shared = {}, {}
    for n in names:
        if n in ("clip_target", "clip_direction"):
            emb = shared.get("clip") or shared.setdefault("clip", C.ClipEmbedder.from_pretrained(str(clip)))
            out[n] = (C.CLIPTargetScore if n == "clip_target" else C.DirectionalCLIPSimilarity)(emb)
        elif n == "dino_structure":
            out[n] = S.DinoStructureDistance(dino)
        elif n == "lpips":
            out[n] = S.LPIPS()
        elif n == "psnr_background":
            out[n] = S.BackgroundPSNR()
        elif n == "ssim_background":
            out[n] = S.BackgroundSSIM()
        else:
            feat = shared.get("features") or shared.setdefault("features", D.FeatureNetwork.from_path(str(fid_features)))
            out[n] = D.FID(feat) if n == "fid" else D.KID(feat, subsets=kid_subsets, subset_size=kid_subset_size)
    return out


def summarize(metric) -> dict:
    """A metric's result as JSON-able numbers: per-image metrics ``{mean, ci95, std, n, undefined}``, FID
    ``{value}``, KID ``{mean, std}`` (std over subsets)."""
    if isinstance(metric, PerImageMetric):
        return {**mean_ci(metric.per_image().cpu().numpy()), "undefined": int(metric.undefined)}
    value = metric.compute()
    if isinstance(value, tuple):
        return {"mean": float(value[0]), "std": float(value[1])}
    return {"value": float(value)}


__all__ = ["BATCH_FIELDS", "METRICS", "SET_LEVEL", "MetricModelError", "MetricUnavailable", "PerImageMetric",
           "available_metrics", "build_metrics", "mean_ci", "summarize"]
