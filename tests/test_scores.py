"""The score math, checked exactly against hand-written formulas and diffusers' own scheduler."""

from __future__ import annotations

import pytest
import torch

import ddstrans
from ddstrans import scores
from ddstrans.guidance import Guidance
from ddstrans.teacher import Teacher


class CountingDenoiser:
    """Wraps a teacher and records every ``predict_noise`` call's batch size."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []
        self.alphas_cumprod = teacher.alphas_cumprod
        self.uncond_embedding = teacher.uncond_embedding

    def predict_noise(self, z_t, t, emb):
        self.calls.append((z_t.shape[0], t.clone()))
        return self.teacher.predict_noise(z_t, t, emb)


def _inputs(teacher, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_src = torch.randn(b, 4, 8, 8, generator=g)
    z_tgt = z_src + 0.3 * torch.randn(b, 4, 8, 8, generator=g)
    emb_src = teacher.encode_prompts(["a photo of a cat"] * b)
    emb_tgt = teacher.encode_prompts(["a photo of a lion"] * b)
    t = torch.randint(50, 950, (b,), generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    return z_src, z_tgt, emb_src, emb_tgt, t, noise


def _hand_cfg_eps(teacher, z, emb, t, noise, scale):
    """Guided epsilon computed directly with the raw diffusers UNet and scheduler."""
    sched, unet = teacher.scheduler, teacher.unet
    z_t = sched.add_noise(z, noise, t)
    uncond = teacher.encode_prompts([""]).expand_as(emb)
    out_u = unet(z_t, t, encoder_hidden_states=uncond).sample
    out_c = unet(z_t, t, encoder_hidden_states=emb).sample
    if teacher.prediction_type == "v_prediction":
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        out_u = a.sqrt() * out_u + (1 - a).sqrt() * z_t
        out_c = a.sqrt() * out_c + (1 - a).sqrt() * z_t
    return out_u + scale * (out_c - out_u)


@pytest.fixture(params=["epsilon", "v_prediction"])
def teacher(request, tiny_teacher_dir, tiny_vpred_teacher_dir, tmp_path):
    path = tiny_teacher_dir if request.param == "epsilon" else tiny_vpred_teacher_dir
    t = Teacher.from_pretrained(path, cache_dir=tmp_path)
    assert t.prediction_type == request.param
    return t


def test_dds_is_exactly_zero_for_matching_image_and_prompt(teacher):
    z_src, _, emb_src, _, t, noise = _inputs(teacher)
    g = ddstrans.dds_grad(teacher, z_src, z_src.clone(), emb_src, emb_src.clone(), t=t, noise=noise, guidance_scale=7.5)
    assert torch.equal(g, torch.zeros_like(g))


def test_dds_equals_sds_difference_with_shared_noise(teacher):
    z_src, z_tgt, emb_src, emb_tgt, t, noise = _inputs(teacher)
    dds = ddstrans.dds_grad(teacher, z_src, z_tgt, emb_src, emb_tgt, t=t, noise=noise, guidance_scale=7.5)
    sds_t = ddstrans.sds_grad(teacher, z_tgt, emb_tgt, t=t, noise=noise, guidance_scale=7.5)
    sds_s = ddstrans.sds_grad(teacher, z_src, emb_src, t=t, noise=noise, guidance_scale=7.5)
    assert dds.abs().max() > 1e-3  # a real, non-trivial difference
    torch.testing.assert_close(dds, sds_t - sds_s, atol=2e-5, rtol=1e-4)


def test_dds_and_sds_match_hand_written_unet_computation(teacher):
    z_src, z_tgt, emb_src, emb_tgt, t, noise = _inputs(teacher)
    with torch.no_grad():
        eps_t = _hand_cfg_eps(teacher, z_tgt, emb_tgt, t, noise, 7.5)
        eps_s = _hand_cfg_eps(teacher, z_src, emb_src, t, noise, 7.5)
    dds = ddstrans.dds_grad(teacher, z_src, z_tgt, emb_src, emb_tgt, t=t, noise=noise, guidance_scale=7.5)
    sds = ddstrans.sds_grad(teacher, z_tgt, emb_tgt, t=t, noise=noise, guidance_scale=7.5)
    torch.testing.assert_close(dds, eps_t - eps_s, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sds, eps_t - noise, atol=2e-5, rtol=1e-4)


def test_guidance_for_timesteps_lowers_guidance_below_the_threshold():
    t = torch.tensor([0, 99, 100, 500])
    assert scores.guidance_for_timesteps(t, 7.5) == 7.5  # off: the scale passes through unchanged
    torch.testing.assert_close(scores.guidance_for_timesteps(t, 7.5, 100, 2.0), torch.tensor([2.0, 2.0, 7.5, 7.5]))
    per_sample = torch.tensor([3.0, 4.0, 5.0, 6.0])  # a per-sample scale keeps its values above the threshold
    torch.testing.assert_close(scores.guidance_for_timesteps(t, per_sample, 100, 1.0), torch.tensor([1.0, 1.0, 5.0, 6.0]))
    only = torch.tensor([True, False, True, False])  # the low scale only for the eligible samples below the threshold
    torch.testing.assert_close(scores.guidance_for_timesteps(t, 7.5, 100, 2.0, only), torch.tensor([2.0, 7.5, 7.5, 7.5]))


def test_dds_and_sds_with_low_t_guidance_match_per_sample_hand_computation(teacher):
    z_src, z_tgt, emb_src, emb_tgt, _, noise = _inputs(teacher)
    t = torch.tensor([60, 700])  # one sample below the threshold, one above
    with torch.no_grad():
        eps_t = torch.cat([_hand_cfg_eps(teacher, z_tgt[i:i + 1], emb_tgt[i:i + 1], t[i:i + 1], noise[i:i + 1], s)
                           for i, s in enumerate((1.5, 7.5))])
        eps_s = torch.cat([_hand_cfg_eps(teacher, z_src[i:i + 1], emb_src[i:i + 1], t[i:i + 1], noise[i:i + 1], s)
                           for i, s in enumerate((1.5, 7.5))])
    kw = dict(t=t, noise=noise, guidance_scale=7.5, guidance_low_t=100, guidance_low=1.5)
    dds = ddstrans.dds_grad(teacher, z_src, z_tgt, emb_src, emb_tgt, **kw)
    sds = ddstrans.sds_grad(teacher, z_tgt, emb_tgt, **kw)
    torch.testing.assert_close(dds, eps_t - eps_s, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sds, eps_t - noise, atol=2e-5, rtol=1e-4)
    plain = ddstrans.dds_grad(teacher, z_src, z_tgt, emb_src, emb_tgt, t=t, noise=noise, guidance_scale=7.5)
    torch.testing.assert_close(dds[1], plain[1], atol=1e-6, rtol=0)  # above the threshold: unchanged
    assert not torch.allclose(dds[0], plain[0])


def test_dds_runs_one_batched_call_with_shared_t_and_noise(tiny_teacher):
    den = CountingDenoiser(tiny_teacher)
    z_src, z_tgt, emb_src, emb_tgt, _, _ = _inputs(tiny_teacher, b=3)
    g, info = Guidance().grad(den, z_src, z_tgt, emb_src, emb_tgt, return_info=True, generator=torch.Generator().manual_seed(1))
    assert len(den.calls) == 1
    batch, t_used = den.calls[0]
    assert batch == 12  # uncond/cond x source/target x 3 samples
    assert torch.equal(t_used, info.t.repeat(4))
    # the same noise in both branches: re-running with the returned t and noise reproduces g exactly
    g2 = Guidance().grad(tiny_teacher, z_src, z_tgt, emb_src, emb_tgt, t=info.t, noise=info.noise)
    torch.testing.assert_close(g, g2, atol=1e-6, rtol=0)


def test_surrogate_loss_gradient_is_the_score_gradient():
    z = torch.randn(2, 4, 6, 5, requires_grad=True)
    grad = torch.randn(2, 4, 6, 5)
    scores.surrogate_loss(z, grad, reduction="sum").backward()
    assert torch.equal(z.grad, grad)
    z.grad = None
    scores.surrogate_loss(z, grad).backward()  # reference reduction: sum / (H * W)
    torch.testing.assert_close(z.grad, grad / 30, atol=0, rtol=1e-6)
    with pytest.raises(ValueError):
        scores.surrogate_loss(z, grad, reduction="bogus")


def test_timesteps_stay_in_range_and_cover_it():
    t = scores.sample_timesteps(20000, Guidance().t_range, generator=torch.Generator().manual_seed(0))
    assert Guidance().t_range == (50, 950)  # the DDS reference's range
    assert t.dtype == torch.long and int(t.min()) == 50 and int(t.max()) == 949
    t = scores.sample_timesteps(5000, (200, 300), generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 200 and int(t.max()) < 300
    with pytest.raises(ValueError):
        scores.sample_timesteps(2, (500, 500))


def test_noising_and_v_conversion_agree_with_diffusers(tiny_vpred_teacher_dir, tmp_path):
    teacher = Teacher.from_pretrained(tiny_vpred_teacher_dir, cache_dir=tmp_path)
    sched = teacher.scheduler
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    z_t = scores.add_noise(x0, eps, t, teacher.alphas_cumprod)
    torch.testing.assert_close(z_t, sched.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    v = sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(scores.velocity(x0, eps, t, teacher.alphas_cumprod), v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.eps_from_v(v, z_t, t, teacher.alphas_cumprod), eps, atol=1e-5, rtol=1e-5)
    x0_back = scores.eps_from_sample(x0, z_t, t, teacher.alphas_cumprod)
    torch.testing.assert_close(x0_back, eps, atol=1e-4, rtol=1e-4)


def test_cfg_and_weighting_formulas():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(scores.classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    per = scores.classifier_free_guidance(u[:, :, None, None], c[:, :, None, None], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per[1, :, 0, 0], u[1] + 3.0 * (c[1] - u[1]))
    torch.testing.assert_close(per[0, :, 0, 0], c[0])
    ac = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 999])
    assert torch.equal(scores.timestep_weight(t, ac, "uniform"), torch.ones(2))
    torch.testing.assert_close(scores.timestep_weight(t, ac, "sds"), 1 - ac[t])
    with pytest.raises(ValueError):
        scores.timestep_weight(t, ac, "nope")


class NaNDenoiser:
    def __init__(self):
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        self.uncond_embedding = torch.zeros(1, 2, 3)

    def predict_noise(self, z_t, t, emb):
        out = torch.zeros_like(z_t)
        out[-1, 0, 0, 0] = float("nan")  # the conditional target branch of the last sample
        out[-1, 0, 0, 1] = float("inf")
        return out


def test_nonfinite_entries_are_zeroed_and_counted():
    den = NaNDenoiser()
    z = torch.randn(2, 1, 2, 2)
    emb = torch.ones(2, 2, 3)
    g, info = scores.dds_grad(den, z, z, emb, emb, guidance_scale=2.0, t_range=(50, 950), return_info=True)
    assert torch.isfinite(g).all()
    assert int(info.nonfinite) == 2
    assert g[1, 0, 0, 0] == 0 and g[1, 0, 0, 1] == 0


def test_shape_mismatch_is_a_clear_error(tiny_teacher):
    z = torch.randn(1, 4, 8, 8)
    emb = tiny_teacher.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="same shape"):
        ddstrans.dds_grad(tiny_teacher, z, torch.randn(1, 4, 4, 4), emb, emb, guidance_scale=7.5, t_range=(50, 950))
    with pytest.raises(ValueError, match="noise shape"):
        ddstrans.sds_grad(tiny_teacher, z, emb, noise=torch.randn(1, 4, 4, 4), guidance_scale=7.5, t_range=(50, 950))
    with pytest.raises(ValueError, match="t_range"):
        ddstrans.sds_grad(tiny_teacher, z, emb, guidance_scale=7.5)  # neither t nor a range to draw it from


def test_identity_loss_holds_only_where_the_score_is_flat():
    grad = torch.zeros(1, 2, 4, 4)
    grad[..., 0, 0] = 3.0  # the edit pulls at pixel (0, 0) only
    mask = scores.edit_mask(grad)
    assert mask[0, 0, 0, 0] == 0 and torch.all(mask[0, 0].flatten()[1:] == 1)
    z_src = torch.zeros(1, 2, 4, 4)
    z = torch.zeros(1, 2, 4, 4, requires_grad=True)
    with torch.no_grad():
        z[..., 0, 0] = 1.0  # change where the edit asks: free
    assert scores.identity_loss(z, z_src, grad) == 0
    with torch.no_grad():
        z[..., 3, 3] = 1.0  # change elsewhere: penalised, sum / (H*W)
    loss = scores.identity_loss(z, z_src, grad)
    assert loss.item() == pytest.approx(2 / 16)
    loss.backward()
    assert z.grad[0, 0, 3, 3] == pytest.approx(2 / 16) and z.grad[0, 0, 0, 0] == 0
    two = torch.cat([z.detach(), z.detach()])  # per-sample weights: only the flagged sample counts
    weighted = scores.identity_loss(two, torch.cat([z_src, z_src]), torch.cat([grad, grad]), weight=torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx(2 / 16)
    ones = scores.identity_loss(two, torch.cat([z_src, z_src]), torch.cat([grad, grad]), weight=torch.ones(2))
    assert ones.item() == pytest.approx(scores.identity_loss(two, torch.cat([z_src, z_src]), torch.cat([grad, grad])).item())


def test_palette_loss_keeps_levels_but_not_their_places():
    """Stripes redrawn as checkers of the same two levels cost nothing; the same checkers at other levels do, by
    the squared distance of the sorted values; a flat gray (the average) costs most of all."""
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    stripes = torch.where(xx % 4 < 2, -0.4, 0.6).expand(1, 3, 8, 8)
    checkers = torch.where((xx // 2 + yy // 2) % 2 == 0, -0.4, 0.6).expand(1, 3, 8, 8)
    darker = torch.where((xx // 2 + yy // 2) % 2 == 0, -0.8, 0.6).expand(1, 3, 8, 8)
    assert scores.palette_loss(checkers, stripes) == 0
    assert scores.palette_loss(darker, stripes).item() == pytest.approx(3 * 0.5 * 0.4**2)  # half the pixels moved
    assert scores.palette_loss(torch.full_like(stripes, 0.1), stripes).item() == pytest.approx(3 * 0.5**2)
    z = darker.clone().requires_grad_(True)
    scores.palette_loss(z, stripes).backward()  # pulls each dark value back to its sorted partner
    dark = darker[0, 0] < 0
    assert torch.allclose(z.grad[0, 0][dark], torch.tensor(2 * -0.4 / 64)) and torch.all(z.grad[0, 0][~dark] == 0)
    two = torch.cat([darker, darker])
    per_sample = scores.palette_loss(two, torch.cat([stripes, stripes]), torch.tensor([0.0, 1.0]))
    assert per_sample.item() == pytest.approx(scores.palette_loss(darker, stripes).item())


def test_shared_noise_is_a_function_of_the_seed_and_mixes_per_sample():
    a, b = scores.shared_noise((3, 4, 4), 7), scores.shared_noise((3, 4, 4), 7)
    assert torch.equal(a, b) and not torch.equal(a, scores.shared_noise((3, 4, 4), 8))
    fresh = torch.randn(64, 3, 4, 4)
    assert scores.mix_shared_noise(fresh, a, 0.0) is fresh
    all_shared = scores.mix_shared_noise(fresh, a, 1.0)
    assert all(torch.equal(x, a) for x in all_shared)
    mixed = scores.mix_shared_noise(fresh, a, 0.5, torch.Generator().manual_seed(0))
    is_shared = torch.tensor([torch.equal(x, a) for x in mixed])
    is_fresh = torch.tensor([torch.equal(x, f) for x, f in zip(mixed, fresh)])
    assert torch.all(is_shared ^ is_fresh)  # each sample whole: either the shared noise or its own
    assert 16 < int(is_shared.sum()) < 48
    only_even = scores.mix_shared_noise(fresh, a, 1.0, eligible=torch.arange(64) % 2 == 0)
    assert all(torch.equal(x, a if i % 2 == 0 else f) for i, (x, f) in enumerate(zip(only_even, fresh)))
    with pytest.raises(ValueError, match="probability"):
        scores.mix_shared_noise(fresh, a, 1.5)
    with pytest.raises(ValueError, match="does not match"):
        scores.mix_shared_noise(fresh, scores.shared_noise((3, 8, 8), 0), 0.5)
