"""SDXL, SD3 and Flux teachers: tiny random directories written by the diffusers pipelines' own save_pretrained,
loaded by Teacher.from_pretrained; prompt encoding against the pipeline's encode_prompt; DDS against a hand
computation with the raw models; sampling against the pipeline; bad directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ddstrans import dds_grad, sds_grad
from ddstrans.embeddings import flatten, unflatten
from ddstrans.teacher import PromptEmbeddings, Teacher, TeacherLoadError

FAMILIES = ("sdxl", "sd3", "flux_dev", "flux_schnell")


def _pipeline(family_dirs, name):
    import diffusers

    cls = json.loads((family_dirs[name] / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, cls).from_pretrained(family_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():  # frozen as the teacher's (autograd on picks other CPU attention kernels)
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    return pipe


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------------- loading
def test_loader_picks_the_family(teachers):
    expect = {"sdxl": ("SDXLTeacher", "epsilon", 4, "cfg"), "sd3": ("SD3Teacher", "flow", 16, "cfg"),
              "flux_dev": ("FluxTeacher", "flow", 16, "embedded"), "flux_schnell": ("FluxTeacher", "flow", 16, "none")}
    for name, (cls, pred, ch, mode) in expect.items():
        t = teachers[name]
        assert isinstance(t, Teacher) and type(t).__name__ == cls, name
        assert (t.prediction_type, t.latent_channels, t.guidance_mode) == (pred, ch, mode), name
    assert teachers["sd3"].latent_shift == pytest.approx(0.0609) and teachers["sd3"].latent_scale == pytest.approx(1.5035)
    assert teachers["flux_dev"].image_multiple == 4  # VAE factor 2 x 2x2 packing


def test_unsupported_family_and_missing_component(family_dirs, tmp_path):
    video = tmp_path / "video"
    video.mkdir()
    (video / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    with pytest.raises(TeacherLoadError) as e:
        Teacher.from_pretrained(video)
    msg = str(e.value)
    assert "\n" not in msg and "StableVideoDiffusionPipeline" in msg
    assert all(f in msg for f in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                                  "FluxPipeline"))
    upscaler = tmp_path / "upscaler"
    shutil.copytree(family_dirs["sd3"], upscaler)
    (upscaler / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    with pytest.raises(TeacherLoadError, match="StableDiffusionUpscalePipeline.*supported families"):
        Teacher.from_pretrained(upscaler)
    broken = tmp_path / "sd3"
    shutil.copytree(family_dirs["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(TeacherLoadError, match=r"lacks component\(s\) text_encoder_2") as e:
        Teacher.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_corrupt_weights_fail_in_one_line(family_dirs, tmp_path):
    broken = tmp_path / "flux"
    shutil.copytree(family_dirs["flux_schnell"], broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TeacherLoadError, match="cannot load flux teacher") as e:
        Teacher.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_sd3_without_t5_encodes_zeros_as_diffusers(tmp_path):
    from ddstrans.testing import make_tiny_sd3

    t = Teacher.from_pretrained(make_tiny_sd3(tmp_path / "no_t5", with_t5=False), cache_dir=tmp_path / "c")
    emb = t.encode_prompts(["a cat"])
    assert emb.hidden.shape[1] == 12 + 256  # CLIP tokens + the pipeline's default T5 count, zeros
    assert torch.count_nonzero(emb.hidden[:, 12:]) == 0


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("name", FAMILIES[:3])
def test_encode_prompts_equals_pipeline_encode_prompt(teachers, family_dirs, name):
    t, pipe = teachers[name], _pipeline(family_dirs, name)
    prompts = ["a photo of a cat", "a red dog on a striped background"]
    emb = t.encode_prompts(prompts)
    assert isinstance(emb, PromptEmbeddings) and len(emb) == 2
    if name == "sdxl":
        h, nh, p, np_ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
        unc_h, unc_p = nh[:1], np_[:1]
        assert torch.count_nonzero(unc_h) == 0  # force_zeros_for_empty_prompt
    elif name == "sd3":
        h, nh, p, np_ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True,
                                           max_sequence_length=16)  # the tiny T5 tokenizer's model_max_length
        unc_h, unc_p = nh[:1], np_[:1]
    else:
        h, p, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=16)
        unc_h = unc_p = None
    torch.testing.assert_close(emb.hidden, h, rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, p, rtol=0, atol=0)
    if unc_h is not None:
        # encoded as a batch of one here, of two by the pipeline: equal up to float32 rounding
        torch.testing.assert_close(t.uncond_embedding.hidden, unc_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t.uncond_embedding.pooled, unc_p, rtol=1e-5, atol=1e-6)


def test_prompt_embeddings_index_cat_cache_and_move(teachers, tmp_path):
    t = teachers["sd3"]
    a = t.encode_prompts(["a cat", "a dog", "a lion"])
    cat = torch.cat([a[:1], a[2:]])
    assert cat.equal(t.encode_prompts(["a cat", "a lion"])) and len(cat) == 2
    assert torch.stack([a, a]).hidden.shape[:2] == (2, 3)
    assert a.to(torch.float16).hidden.dtype == torch.float16 and a.to("cpu").device.type == "cpu"
    assert unflatten(flatten(a, "source"), "source").equal(a)
    calls = t.text_encoder_calls
    fresh = Teacher.from_pretrained(t.root, cache_dir=t.cache_dir)  # same directory: embeddings read from disk
    assert fresh.encode_prompts(["a dog"]).equal(a[1:2]) and fresh.text_encoder_calls == 0
    assert t.text_encoder_calls == calls


# ---------------------------------------------------------------------------------------------------- DDS by hand
def _raw_ddpm_eps(unet, sched, z, t, hidden, pooled, image_hw):
    ids = torch.tensor([[*image_hw, 0, 0, *image_hw]], dtype=torch.float32).expand(z.shape[0], -1)
    return unet(z, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def _pack(z):  # written out here: (B, C, h, w) -> (B, h/2 * w/2, 4C)
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def _unpack(x, h, w):
    b, n, d = x.shape
    return x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _raw_flux_v(tr, z, sigma, hidden, pooled, guidance):
    b, _, h, w = z.shape
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    g = torch.full((b,), float(guidance)) if guidance is not None else None
    out = tr(hidden_states=_pack(z), timestep=sigma.expand(b), guidance=g, pooled_projections=pooled,
             encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids.reshape(-1, 3)).sample
    return _unpack(out, h, w)


@pytest.mark.parametrize("name", FAMILIES)
def test_dds_grad_equals_hand_computation_with_raw_models(teachers, family_dirs, name):
    from diffusers import (
        EulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    t, root = teachers[name], family_dirs[name]
    g = torch.Generator().manual_seed(3)
    z_src = torch.randn(2, t.latent_channels, 8, 8, generator=g)
    z_tgt = z_src + 0.3 * torch.randn(z_src.shape, generator=g)
    noise = torch.randn(z_src.shape, generator=g)
    es, et = t.encode_prompts(["a photo of a cat"] * 2), t.encode_prompts(["a photo of a lion", "a dog"])
    tt = torch.tensor([300, 700])
    s = 4.0
    got = dds_grad(t, z_src, z_tgt, es, et, t=tt, noise=noise, guidance_scale=s)
    u = t.uncond_embedding
    with torch.no_grad():
        if name == "sdxl":
            unet = UNet2DConditionModel.from_pretrained(root / "unet")
            abar = EulerDiscreteScheduler.from_pretrained(root / "scheduler").alphas_cumprod[tt].reshape(-1, 1, 1, 1)

            def eps(z, e):
                zt = abar.sqrt() * z + (1 - abar).sqrt() * noise
                cond = _raw_ddpm_eps(unet, None, zt, tt, e.hidden, e.pooled, (16, 16))
                unc = _raw_ddpm_eps(unet, None, zt, tt, u.hidden.expand(2, -1, -1), u.pooled.expand(2, -1), (16, 16))
                return unc + s * (cond - unc)
        else:
            sigma = (tt.float() / 1000).reshape(-1, 1, 1, 1)
            if name == "sd3":
                tr = SD3Transformer2DModel.from_pretrained(root / "transformer")

                def v(zt, e):
                    return tr(hidden_states=zt, timestep=tt.float(), encoder_hidden_states=e.hidden,
                              pooled_projections=e.pooled).sample

                def vhat(zt, e):
                    unc = v(zt, PromptEmbeddings(hidden=u.hidden.expand(2, -1, -1), pooled=u.pooled.expand(2, -1)))
                    return unc + s * (v(zt, e) - unc)
            else:
                tr = FluxTransformer2DModel.from_pretrained(root / "transformer")
                guid = s if name == "flux_dev" else None

                def vhat(zt, e):  # no unconditional branch: the guidance is an input (dev) or absent (schnell)
                    return _raw_flux_v(tr, zt, sigma.reshape(-1), e.hidden, e.pooled, guid)

            def eps(z, e):
                zt = (1 - sigma) * z + sigma * noise
                return zt + (1 - sigma) * vhat(zt, e)
        want = eps(z_tgt, et) - eps(z_src, es)
    assert _rel(got, want) < 1e-4, name
    if name != "sdxl":  # the epsilon-space identity of ddstrans.flow and the velocity option
        vel = dds_grad(t, z_src, z_tgt, es, et, t=tt, noise=noise, guidance_scale=s, space="velocity")
        x0_t = (1 - sigma) * z_tgt + sigma * noise - sigma * vhat((1 - sigma) * z_tgt + sigma * noise, et)
        x0_s = (1 - sigma) * z_src + sigma * noise - sigma * vhat((1 - sigma) * z_src + sigma * noise, es)
        assert _rel(got, (1 - sigma) / sigma * ((z_tgt - z_src) - (x0_t - x0_s))) < 1e-4
        assert _rel(vel, (want / (1 - sigma)) - (z_tgt - z_src)) < 1e-4  # eps diff = (1-s)(dz + dv)


@pytest.mark.parametrize("name", FAMILIES)
def test_dds_zero_for_matched_pair_and_evaluation_count(teachers, name):
    t = teachers[name]
    calls = []
    fn = "predict_velocity" if t.is_flow else "predict_noise"
    orig = getattr(t, fn)

    def spy(z, *a, **k):
        calls.append(z.shape[0])
        return orig(z, *a, **k)

    z = torch.randn(2, t.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = t.encode_prompts(["a cat", "a dog"])
    setattr(t, fn, spy)
    try:
        grad = dds_grad(t, z, z.clone(), emb, emb, guidance_scale=5.0, t_range=(50, 950),
                        generator=torch.Generator().manual_seed(1))
        sds = sds_grad(t, z, emb, guidance_scale=5.0, t_range=(50, 950), generator=torch.Generator().manual_seed(1))
    finally:
        delattr(t, fn)
    assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(sds) > 0
    per_dds = 4 if t.guidance_mode == "cfg" else 2
    assert calls == [per_dds * 2, per_dds // 2 * 2]  # one batched call each: DDS, SDS


def test_flow_timestep_sampling_range_shift_and_logit_normal(teachers):
    t = teachers["sd3"]  # shift 3: sigma pushed towards 1
    g = torch.Generator().manual_seed(0)
    ts = t.sample_timesteps(4000, (50, 950), latent_hw=(8, 8), generator=g)
    assert ts.dtype == torch.float32 and ts.min() >= 50 and ts.max() < 950
    assert ts.median() > 600  # uniform un-shifted would be 500
    plain = t.sample_timesteps(4000, (50, 950), latent_hw=(8, 8), generator=g, sampling="logit_normal")
    assert plain.min() >= 50 and plain.max() < 950 and abs((plain < 500).float().mean() - 0.5) > 0.05
    flux = teachers["flux_dev"]  # dynamic shift: exp(mu) grows with the image's token count
    assert flux.timestep_shift((128, 128)) > flux.timestep_shift((16, 16)) > 1.0
    assert teachers["flux_schnell"].timestep_shift((128, 128)) == 1.0


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ("sdxl", "sd3", "flux_dev"))
def test_sample_matches_the_pipeline(teachers, family_dirs, name):
    t, pipe = teachers[name], _pipeline(family_dirs, name)
    kw = {"max_sequence_length": 16} if name != "sdxl" else {}
    mine = t.sample(["a photo of a cat"], num_inference_steps=3, guidance_scale=4.0, size=16,
                    generator=torch.Generator().manual_seed(7))
    ref = pipe("a photo of a cat", num_inference_steps=3, guidance_scale=4.0, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(7), **kw).images
    torch.testing.assert_close(mine * 0.5 + 0.5, ref.float(), rtol=0, atol=1e-5)


def test_flow_math_plain_functions():
    from ddstrans import flow

    s = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(flow.unshift_sigma(flow.shift_sigma(s, 3.0), 3.0), s)
    x0, eps = torch.randn(50, 4), torch.randn(50, 4)
    xs = flow.flow_add_noise(x0, eps, s)
    v = flow.flow_velocity(x0, eps)
    torch.testing.assert_close(flow.eps_from_velocity(v, xs, s), eps)  # exact velocity -> exact noise and image
    torch.testing.assert_close(flow.x0_from_velocity(v, xs, s), x0)
    abar = flow.equivalent_alphas_cumprod(s)  # the DDPM abar of the same signal-to-noise ratio
    torch.testing.assert_close(abar / (1 - abar), ((1 - s) / s) ** 2, rtol=1e-3, atol=0)  # SNR up to ~1e4
    with pytest.raises(ValueError, match="t_min < t_max"):
        flow.sample_flow_timesteps(2, (900, 100))
    with pytest.raises(ValueError, match="sigma sampling"):
        flow.sample_flow_timesteps(2, (0, 1000), sampling="beta")


def test_prompt_embeddings_reject_mismatched_fields():
    with pytest.raises(ValueError, match="hidden"):
        PromptEmbeddings(pooled=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="leading size 2"):
        PromptEmbeddings(hidden=torch.zeros(2, 4, 8), pooled=torch.zeros(3, 5))
    a = PromptEmbeddings(hidden=torch.zeros(1, 4, 8), pooled=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="different fields"):
        torch.cat([a, PromptEmbeddings(hidden=torch.zeros(1, 4, 8))])
