"""ddstrans.guidance: one home for the DDS/SDS defaults, which the configs and the users read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ddstrans.guidance import Guidance
from ddstrans.module import LOSS_TERMS, loss_defaults

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_loss_configs_hold_only_known_keys_that_change_a_default():
    """Each loss YAML lists keys of the dataclass or of LOSS_TERMS only, none at its default value: the default
    itself lives in Python once, and the composed config gets it from the registered ``loss/base``."""
    defaults = loss_defaults()
    for path in sorted((CONFIGS / "loss").glob("*.yaml")):
        own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
        assert set(own) <= set(defaults), (path.name, sorted(set(own) - set(defaults)))
        for k, v in own.items():
            assert v != defaults[k] or k == "method", f"{path.name}: {k}={v} repeats the default"


def test_composed_loss_config_is_the_dataclass_defaults_plus_the_yaml(tmp_path):
    from ddstrans.cli.train import compose

    cfg = OmegaConf.to_container(compose([], tmp_path).loss, resolve=True)
    assert set(cfg) == set(loss_defaults())
    g = Guidance.from_mapping(cfg)
    assert g.method == "dds" and g.guidance == Guidance().guidance and g.t_range == Guidance().t_range
    assert (g.guidance_start, g.warmup_steps) == (1.0, 1000)  # loss/dds.yaml: training warms the guidance up
    assert {k: cfg[k] for k in LOSS_TERMS} == LOSS_TERMS
    sds = OmegaConf.to_container(compose(["loss=sds"], tmp_path / "s").loss, resolve=True)
    assert sds == {**cfg, "method": "sds"}


def test_schedules_follow_the_ramps():
    g = Guidance(guidance=7.0, guidance_start=1.0, warmup_steps=100, t_range=(50, 650), t_range_end=(10, 250),
                 t_range_steps=4)
    assert [g.scale_at(s) for s in (0, 50, 100, 10**6)] == [1.0, 4.0, 7.0, 7.0]
    assert [g.t_range_at(s) for s in range(5)] == [(50, 650), (40, 550), (30, 450), (20, 350), (10, 250)]
    assert Guidance().scale_at(0) == Guidance().guidance  # no warm-up by default
    late = Guidance(t_range=(50, 650), t_range_end=(10, 250), t_range_steps=4, t_range_late=(10, 150),
                    t_range_late_from_step=3)
    assert [late.t_range_at(s) for s in (2, 3, 10**6)] == [(30, 450), (10, 150), (10, 150)]
    phases = late.replace(t_range_phases=[[5, [50, 600]], {"from_step": 8, "t_range": [5, 50]}, [9, (10, 300)]])
    assert [phases.t_range_at(s) for s in (2, 3, 5, 7, 8, 9, 10**6)] == [
        (30, 450), (10, 150), (50, 600), (50, 600), (5, 50), (10, 300), (10, 300)]
    assert phases.to_dict()["t_range_phases"] == [[5, [50, 600]], [8, [5, 50]], [9, [10, 300]]]
    assert Guidance.from_mapping(phases.to_dict()) == phases  # a config round trip keeps the phases


@pytest.mark.parametrize("bad,name", [({"method": "ddim"}, "method"), ({"t_range": (5, 1200)}, "t_range"),
                                      ({"weighting": "x"}, "weighting"), ({"shared_noise_prob": 1.5}, "shared_noise_prob"),
                                      ({"guidance_low_t": 2000}, "guidance_low_t"), ({"warmup_kind": "x"}, "warmup_kind"),
                                      ({"t_range_late": (150, 10)}, "t_range_late"),
                                      ({"t_range_late_from_step": -1}, "t_range_late_from_step"),
                                      ({"t_range_mix": (30, 10)}, "t_range_mix"),
                                      ({"t_range_phases": [[5, (5, 50)], [5, (10, 300)]]}, "t_range_phases"),
                                      ({"t_range_phases": [[9, (5, 50)], [5, (10, 300)]]}, "t_range_phases"),
                                      ({"t_range_phases": [[5, (50, 5)]]}, "t_range_phases"),
                                      ({"t_range_phases": [[5]]}, "t_range_phases"),
                                      ({"t_range_phases": [{"from_step": 5}]}, "t_range_phases"),
                                      ({"t_range_mix_prob": 1.5}, "t_range_mix_prob"),
                                      ({"t_range_mix_from_step": -1}, "t_range_mix_from_step")])
def test_bad_settings_name_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        Guidance(**bad)


class _Ddpm:
    prediction_type = "epsilon"


class _Flow:
    """The flow teachers' timestep interface (``FlowTeacher.sample_timesteps``) without a model."""

    prediction_type = "flow"

    def sample_timesteps(self, batch_size, t_range, *, latent_hw, device=None, generator=None, sampling=None):
        from ddstrans.flow import sample_flow_timesteps

        return sample_flow_timesteps(batch_size, t_range, sampling=sampling or "uniform", device=device,
                                     generator=generator)


@pytest.mark.parametrize("teacher", [_Ddpm(), _Flow()], ids=["ddpm", "flow"])
def test_timestep_mix_draws_that_share_in_the_second_band(teacher):
    """From ``t_range_mix_from_step`` on, about ``t_range_mix_prob`` of the samples fall in ``t_range_mix`` and the
    rest in the scheduled range; before it, and without a mix, the score draws its own timesteps (None)."""
    z = torch.zeros(4000, 1, 2, 2)
    g = Guidance(t_range=(300, 900), t_range_mix=(1, 20), t_range_mix_prob=0.25, t_range_mix_from_step=10)
    assert g.timesteps(teacher, z, 9) is None and Guidance().timesteps(teacher, z, 0) is None
    t = g.timesteps(teacher, z, 10, torch.Generator().manual_seed(0))
    low, high = (t >= 1) & (t < 20), (t >= 300) & (t < 900)
    assert bool((low | high).all()) and 0.22 < low.float().mean() < 0.28
    assert t.is_floating_point() == isinstance(teacher, _Flow)
    again = g.timesteps(teacher, z, 10, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)  # one generator, one draw: resumable and equal on every rank
    every = g.replace(t_range_mix_prob=1.0).timesteps(teacher, z, 10, torch.Generator().manual_seed(1))
    assert bool(((every >= 1) & (every < 20)).all())


def test_grad_uses_the_mixed_timesteps(tiny_teacher):
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e_src, e_tgt = tiny_teacher.encode_prompts(["a cat"] * 64), tiny_teacher.encode_prompts(["a lion"] * 64)
    g = Guidance(t_range=(500, 900), t_range_mix=(1, 20), t_range_mix_prob=0.5)
    _, info = g.grad(tiny_teacher, z, z + 0.1, e_src, e_tgt, 0, generator=torch.Generator().manual_seed(0),
                     return_info=True)
    low = info.t < 20
    assert bool((low | ((info.t >= 500) & (info.t < 900))).all()) and 0 < int(low.sum()) < 64
    _, plain = Guidance(t_range=(500, 900)).grad(tiny_teacher, z, z + 0.1, e_src, e_tgt, 0, return_info=True)
    assert bool((plain.t >= 500).all())


def test_noise_policy():
    z = torch.zeros(4, 2, 3, 3)
    assert Guidance().noise(z) is None  # fresh noise, drawn inside the score
    every = Guidance(shared_noise_prob=1.0, shared_noise_seed=7).noise(z)
    assert all(torch.equal(x, every[0]) for x in every)
    some = Guidance(shared_noise_prob=1.0, shared_noise_seed=7).noise(z, torch.Generator().manual_seed(0),
                                                                       torch.tensor([True, False, True, False]))
    assert [torch.equal(x, every[0]) for x in some] == [True, False, True, False]


def test_grad_is_the_scores_dds_and_sds(tiny_teacher):
    from ddstrans.scores import dds_grad, sds_grad

    g = torch.Generator().manual_seed(0)
    z_src, z_tgt = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    e_src, e_tgt = tiny_teacher.encode_prompts(["a cat"] * 2), tiny_teacher.encode_prompts(["a lion"] * 2)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8, generator=g)
    s = Guidance(guidance=4.0, guidance_start=1.0, warmup_steps=10, source_guidance=2.0)
    got = s.grad(tiny_teacher, z_src, z_tgt, e_src, e_tgt, 5, t=t, noise=noise)
    want = dds_grad(tiny_teacher, z_src, z_tgt, e_src, e_tgt, t=t, noise=noise, guidance_scale=2.5,
                    source_guidance_scale=2.0)
    torch.testing.assert_close(got, want)
    sds = s.replace(method="sds").grad(tiny_teacher, None, z_tgt, None, e_tgt, 10, t=t, noise=noise)
    torch.testing.assert_close(sds, sds_grad(tiny_teacher, z_tgt, e_tgt, t=t, noise=noise, guidance_scale=4.0))


def test_the_reference_guidance_is_written_once():
    """The DDS reference scale appears as a literal in one Python file of the package, its home."""
    root = Path(__file__).resolve().parents[1]
    homes = [p.relative_to(root).as_posix() for p in (root / "ddstrans").rglob("*.py")
             if any("7.5" in line and "127.5" not in line for line in p.read_text().splitlines())]
    assert homes == ["ddstrans/guidance.py"]
