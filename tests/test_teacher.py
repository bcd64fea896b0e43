"""Loading, freezing, prompt encoding and caching of the teacher."""

from __future__ import annotations

import pytest
import torch

import ddstrans
from ddstrans.teacher import Teacher, TeacherLoadError


def test_loads_frozen_components(tiny_teacher_dir, tmp_path):
    t = ddstrans.Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path)
    for m in (t.unet, t.text_encoder, t.vae):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
    assert t.prediction_type == "epsilon"
    assert t.latent_scale == pytest.approx(t.vae.config.scaling_factor)
    assert t.downsample_factor == 2 and t.image_size == 16 and t.latent_channels == 4
    assert t.alphas_cumprod.shape == (1000,)


def test_pixel_teacher_latents_are_images(tiny_pixel_teacher_dir, tmp_path):
    t = Teacher.from_pretrained(tiny_pixel_teacher_dir, cache_dir=tmp_path)
    assert t.vae is None and t.downsample_factor == 1 and t.latent_scale == 1.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(t.encode_images(x), x)
    assert torch.equal(t.decode_latents(x), x)


def test_vae_roundtrip_shapes_and_divisibility(tiny_teacher):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = tiny_teacher.encode_images(x)
    assert z.shape == (2, 4, 8, 8)
    assert tiny_teacher.decode_latents(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        tiny_teacher.encode_images(torch.zeros(1, 3, 15, 16))


def test_prompt_encoding_is_standard_sd_encoding(tiny_teacher):
    prompts = ["a photo of a cat", "a red circle on a striped background"]
    emb = tiny_teacher.encode_prompts(prompts)
    tok = tiny_teacher.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = tiny_teacher.text_encoder(ids.input_ids)[0]
    assert emb.shape == (2, tok.model_max_length, 32)
    torch.testing.assert_close(emb, ref)
    torch.testing.assert_close(tiny_teacher.uncond_embedding, tiny_teacher.encode_prompts([""]))


def test_prompt_cache_in_memory_and_on_disk(tiny_teacher_dir, tmp_path):
    t = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path)
    first = t.encode_prompts(["a photo of a dog", "a photo of a cat"])
    assert t.text_encoder_calls == 1
    again = t.encode_prompts(["a photo of a cat", "a photo of a dog"])
    assert t.text_encoder_calls == 1  # served from memory
    torch.testing.assert_close(again, first.flip(0))
    fresh = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path)
    from_disk = fresh.encode_prompts(["a photo of a cat"])
    assert fresh.text_encoder_calls == 0  # served from the disk cache
    torch.testing.assert_close(from_disk[0], first[1])
    other = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path / "elsewhere")
    other.encode_prompts(["a photo of a cat"])
    assert other.text_encoder_calls == 1


def test_half_precision_option(tiny_teacher_dir, tmp_path):
    t = Teacher.from_pretrained(tiny_teacher_dir, torch_dtype=torch.float16, cache_dir=tmp_path)
    assert t.unet.dtype == torch.float16 and t.text_encoder.dtype == torch.float16
    assert t.encode_prompts(["a cat"]).dtype == torch.float16
    assert t.alphas_cumprod.dtype == torch.float32


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist") as e:
        Teacher.from_pretrained(tmp_path / "nope")
    assert "\n" not in str(e.value)


def test_missing_component_is_named(tiny_teacher_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(TeacherLoadError, match="text_encoder") as e:
        Teacher.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_wrong_weight_file_is_a_clear_error(tiny_teacher_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(TeacherLoadError, match="unet") as e:
        Teacher.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_text("x")
    with pytest.raises(TeacherLoadError, match="is a file"):
        Teacher.from_pretrained(f)


def test_prompt_cache_is_invalidated_when_the_text_encoder_is_retrained_in_place(tiny_teacher_dir, tmp_path):
    import os
    import shutil

    root = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, root)
    first = Teacher.from_pretrained(root, cache_dir=tmp_path / "cache")
    first.encode_prompts(["a photo of a cat"])
    weights = root / "text_encoder" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, rewritten later
    again = Teacher.from_pretrained(root, cache_dir=tmp_path / "cache")
    again.encode_prompts(["a photo of a cat"])
    assert again.text_encoder_calls == 1  # not served from the stale disk cache


def test_ddim_cfg_loop_takes_a_guidance_schedule_per_timestep(tiny_teacher):
    from ddstrans.teacher import ddim_cfg_loop, ddim_scheduler

    t = tiny_teacher
    emb = t.encode_prompts(["a cat", "a dog"])
    unc = t.uncond_embedding.expand_as(emb)
    z = torch.randn(2, t.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(g, **overrides):
        return ddim_cfg_loop(t.unet, ddim_scheduler(t.scheduler, 4, **overrides), z, emb, unc, g)

    seen = []
    constant = run(lambda step: seen.append(step) or 3.0)
    assert seen == [int(s) for s in ddim_scheduler(t.scheduler, 4).timesteps]  # called once per step, with its t
    assert torch.equal(constant, run(3.0))  # a constant schedule is the float
    split = run(lambda step: 3.0 if step >= 500 else 1.0)
    assert not torch.allclose(split, constant)
    trailing = ddim_scheduler(t.scheduler, 4, timestep_spacing="trailing")
    assert int(trailing.timesteps[0]) == 999 and not torch.equal(run(3.0, timestep_spacing="trailing"), constant)
    # Teacher.sample passes both through
    sampled = t.sample(["a cat", "a dog"], num_inference_steps=4, latents=z, timestep_spacing="trailing",
                       guidance_scale=lambda step: 3.0 if step >= 500 else 1.0)
    expect = ddim_cfg_loop(t.unet, trailing, z, emb, unc, lambda step: 3.0 if step >= 500 else 1.0)
    assert torch.equal(sampled, t.decode_latents(expect))


def test_ddim_cfg_loop_eta_adds_seeded_noise_at_every_step(tiny_teacher):
    from ddstrans.teacher import ddim_cfg_loop, ddim_scheduler

    t = tiny_teacher
    emb = t.encode_prompts(["a cat", "a dog"])
    unc = t.uncond_embedding.expand_as(emb)
    z = torch.randn(2, t.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(eta, seed=1):
        return ddim_cfg_loop(t.unet, ddim_scheduler(t.scheduler, 4), z, emb, unc, 2.0, eta=eta,
                             generator=torch.Generator().manual_seed(seed))

    deterministic = run(0.0)
    assert torch.equal(deterministic, run(0.0, seed=2))  # eta 0 draws nothing
    stochastic = run(1.0)
    assert torch.equal(stochastic, run(1.0))  # reproducible from its generator
    assert not torch.allclose(stochastic, deterministic) and not torch.allclose(stochastic, run(1.0, seed=2))
    sampled = t.sample(["a cat", "a dog"], num_inference_steps=4, latents=z, guidance_scale=2.0, eta=1.0,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, t.decode_latents(stochastic))
    seen = []
    assert torch.equal(run(lambda step: seen.append(step) or 1.0), stochastic)  # a constant schedule is the float
    assert seen == [int(s) for s in ddim_scheduler(t.scheduler, 4).timesteps]
    split = run(lambda step: 1.0 if step >= 500 else 0.0)  # noise only at high t
    assert not torch.allclose(split, stochastic) and not torch.allclose(split, deterministic)


def test_sample_clip_override_replaces_the_scheduler_configs_clamping(tiny_teacher):
    from ddstrans.teacher import ddim_cfg_loop, ddim_scheduler

    t = tiny_teacher
    assert not t.scheduler.config.clip_sample  # the tiny teacher's config does not clamp (as Stable Diffusion's)
    emb = t.encode_prompts(["a cat"])
    unc = t.uncond_embedding.expand_as(emb)
    z = 3 * torch.randn(1, t.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))  # x0 estimates past 1
    unclamped = ddim_cfg_loop(t.unet, ddim_scheduler(t.scheduler, 4), z, emb, unc, 2.0)
    clamped = ddim_cfg_loop(t.unet, ddim_scheduler(t.scheduler, 4, clip_sample=True), z, emb, unc, 2.0)
    assert not torch.allclose(unclamped, clamped)
    for override, expect in ((True, clamped), (None, unclamped), (False, unclamped)):
        got = t.sample(["a cat"], num_inference_steps=4, latents=z, guidance_scale=2.0, clip_sample=override)
        assert torch.equal(got, t.decode_latents(expect)), override
