"""ddstrans.metrics against hand computations from the raw models (tiny random CLIP / DINO / Inception-like)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddstrans.images import pil_to_tensor
from ddstrans.metrics import (
    MetricModelError,
    MetricUnavailable,
    available_metrics,
    build_metrics,
    mean_ci,
    summarize,
)
from ddstrans.testing import make_tiny_clip, make_tiny_dino, make_tiny_inception


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("metric_models")
    return {"clip": make_tiny_clip(d / "clip"), "vit": make_tiny_dino(d / "vit"),
            "dinov2": make_tiny_dino(d / "dinov2", kind="dinov2"), "inception": make_tiny_inception(d / "inc.pt")}


def _pils(n, seed, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _raw_clip(path, pils, prompts):
    """Normalised embeddings straight from transformers: its image processor, tokenizer and model."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=pils, return_tensors="pt"))
        t = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    pooled = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output  # noqa: E731
    return F.normalize(pooled(img), dim=-1), F.normalize(pooled(txt), dim=-1)


def test_directional_clip_equals_the_raw_models_embeddings(models):
    src, out = _pils(5, 0), _pils(5, 1)
    s_prompts = ["a photo of a cat"] * 3 + ["a red circle"] * 2
    t_prompts = ["a photo of a lion"] * 3 + ["a blue square"] * 2
    m = build_metrics(["clip_direction"], clip=models["clip"])["clip_direction"]
    m.update_from({"inputs": pil_to_tensor(src), "outputs": pil_to_tensor(out), "source_prompts": s_prompts,
                   "target_prompts": t_prompts})
    i0, ts = _raw_clip(models["clip"], src, s_prompts)
    i1, tt = _raw_clip(models["clip"], out, t_prompts)
    want = F.cosine_similarity(i1 - i0, tt - ts, dim=-1).double()
    torch.testing.assert_close(m.per_image(), want, atol=1e-5, rtol=0)
    assert abs(float(m.compute()) - float(want.mean())) < 1e-5 and int(m.undefined) == 0


def test_clip_target_score_is_torchmetrics_scaling_of_the_raw_cosine(models):
    out = _pils(4, 2)
    prompts = ["a photo of a dog", "a lion", "a green triangle", "a cat on striped background"]
    m = build_metrics(["clip_target"], clip=models["clip"])["clip_target"]
    m.update(pil_to_tensor(out), prompts)
    img, txt = _raw_clip(models["clip"], out, prompts)
    want = (100 * (img * txt).sum(-1).clamp(min=0)).double()
    torch.testing.assert_close(m.per_image(), want, atol=1e-3, rtol=0)


def test_unchanged_image_has_no_direction_and_is_left_out_of_the_mean(models):
    x, y = pil_to_tensor(_pils(2, 3)), pil_to_tensor(_pils(2, 4))
    m = build_metrics(["clip_direction"], clip=models["clip"])["clip_direction"]
    outputs = torch.stack([x[0], y[1]])  # image 0 unchanged (identity), image 1 edited
    m.update_from({"inputs": x, "outputs": outputs, "source_prompts": ["a cat"] * 2, "target_prompts": ["a dog"] * 2})
    assert int(m.undefined) == 1 and m.per_image().numel() == 1
    assert np.isfinite(float(m.compute()))
    s = summarize(m)
    assert s["n"] == 1 and s["undefined"] == 1 and s["mean"] == pytest.approx(float(m.per_image()[0]))
    same_prompts = build_metrics(["clip_direction"], clip=models["clip"])["clip_direction"]
    same_prompts.update(x, y, ["a cat"] * 2, ["a cat"] * 2)  # no text change: undefined as well
    assert int(same_prompts.undefined) == 2 and summarize(same_prompts)["mean"] is None


def _raw_dino_self_similarity(path, x01):
    """Keys of the last block computed by hand: its pre-attention LayerNorm on the hidden states entering it,
    then its key projection; cosine similarities between all tokens."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hs = model(pixel_values=(x01 - mean) / std, output_hidden_states=True).hidden_states
        last = [m for n, m in model.named_modules() if n.endswith("layer.1") or n.endswith("layers.1")][-1]
        norm = getattr(last, "layernorm_before", None) or last.norm1
        keys = F.normalize(last.attention.k_proj(norm(hs[-2])), dim=-1)
    return keys @ keys.transpose(1, 2)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_dino_structure_distance_is_the_mse_of_key_self_similarities(models, kind):
    x, y = pil_to_tensor(_pils(3, 5)), pil_to_tensor(_pils(3, 6))
    m = build_metrics(["dino_structure"], dino=models[kind])["dino_structure"]
    m.update(x, y)
    a, b = _raw_dino_self_similarity(models[kind], (x + 1) / 2), _raw_dino_self_similarity(models[kind], (y + 1) / 2)
    assert a.shape[-1] == 1 + (32 // 8) ** 2
    torch.testing.assert_close(m.per_image(), (a - b).pow(2).flatten(1).mean(1).double(), atol=1e-6, rtol=1e-5)
    assert float(m.per_image().min()) > 0
    same = build_metrics(["dino_structure"], dino=models[kind])["dino_structure"]
    same.update(x, x.clone())
    assert float(same.per_image().abs().max()) == 0.0


def test_fid_and_kid_equal_the_formulas_on_the_raw_networks_features(models):
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    real = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1
    fake = (torch.rand(24, 3, 32, 32, generator=g) * 1.6 - 0.8).clamp(-1, 1)
    ms = build_metrics(["fid", "kid"], fid_features=models["inception"], targets=True, kid_subsets=2, kid_subset_size=24)
    for m in ms.values():
        m.add_real(real[:10])
        m.add_real(real[10:])
        m.update_from({"outputs": fake})
    net = torch.jit.load(str(models["inception"]))

    def feats(x):
        x = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            return net(x * 255, return_features=True).double().numpy()

    fr, ff = feats(real), feats(fake)
    mu1, mu2, s1, s2 = fr.mean(0), ff.mean(0), np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert summarize(ms["fid"])["value"] == pytest.approx(fid, rel=1e-3, abs=1e-6)
    d = fr.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731 - KID's polynomial kernel
    n = len(fr)
    kxx, kyy, kxy = k(fr, fr), k(ff, ff), k(fr, ff)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert summarize(ms["kid"])["mean"] == pytest.approx(mmd, rel=5e-3)  # torchmetrics sums in float32
    ms["fid"].reset()  # the target set's features stay; the next method's outputs start afresh
    ms["fid"].update_from({"outputs": real})
    assert summarize(ms["fid"])["value"] == pytest.approx(0.0, abs=1e-3)


def test_background_psnr_and_ssim_outside_the_mask():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = x.clone()
    y[:, :, 8:16, 8:16] = -y[:, :, 8:16, 8:16]  # changed inside the mask only
    y[1, :, 24:, 24:] += 0.1  # ... and, in image 1, a little outside it
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 8:16] = 1
    ms = build_metrics(["psnr_background", "ssim_background"], masks=True)
    for m in ms.values():
        m.update_from({"inputs": x, "outputs": y, "masks": mask})
    psnr = ms["psnr_background"].per_image()
    assert psnr[0] == pytest.approx(100.0)  # untouched background: the cap
    bg = (mask[1] < 0.5).expand(3, -1, -1)
    d = (((y[1] + 1) / 2).clamp(0, 1) - ((x[1] + 1) / 2).clamp(0, 1))[bg]
    assert float(psnr[1]) == pytest.approx(float(10 * torch.log10(1 / d.pow(2).mean())), rel=1e-5)
    ssim = ms["ssim_background"].per_image()
    assert 0.5 < ssim[1] < ssim[0] <= 1.0 + 1e-6


def test_missing_and_wrong_models_say_what_provides_them(models, tmp_path):
    with pytest.raises(MetricUnavailable, match="needs clip") as e:
        build_metrics(["clip_direction"])
    assert e.value.param == "clip"
    with pytest.raises(MetricUnavailable, match="needs masks"):
        build_metrics(["psnr_background"])
    with pytest.raises(MetricUnavailable, match="needs targets"):
        build_metrics(["fid"], fid_features=models["inception"])
    with pytest.raises(MetricModelError, match="not CLIP"):
        build_metrics(["clip_target"], clip=models["vit"])
    with pytest.raises(MetricModelError, match="not a ViT"):
        build_metrics(["dino_structure"], dino=models["clip"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a network")
    with pytest.raises(MetricModelError, match="not a TorchScript"):
        build_metrics(["fid"], fid_features=junk, targets=True)
    with pytest.raises(MetricModelError, match="no config.json"):
        build_metrics(["dino_structure"], dino=tmp_path)


def test_lpips_is_optional_with_one_line_why():
    from ddstrans.metrics.structure import lpips_available

    if lpips_available():
        pytest.skip("torchvision is importable here: LPIPS runs")
    assert "lpips" not in available_metrics(clip="c", dino="d")
    with pytest.raises(MetricUnavailable, match="needs torchvision") as e:
        build_metrics(["lpips"])
    assert "\n" not in str(e.value) and "dino_structure" in str(e.value)


def test_mean_ci_is_students_t_interval():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["ci95"] == pytest.approx(3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)  # t(0.975, 3)
    assert mean_ci([]) == {"mean": None, "ci95": None, "std": None, "n": 0}
    assert mean_ci([7.0])["ci95"] is None
