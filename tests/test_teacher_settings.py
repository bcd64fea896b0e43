"""A teacher's own sampling and DDS settings (ddstrans_settings.json): read, validated, used unless overridden."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

from ddstrans.cli.main import main
from ddstrans.guidance import Guidance
from ddstrans.teacher_settings import (
    FAMILY_SAMPLING,
    SETTINGS_FILE,
    TeacherSettings,
    TeacherSettingsError,
    load_settings,
    parse_settings,
)

SETTINGS = {
    "format": "ddstrans-teacher-settings/1",
    "sampling": {"num_inference_steps": 3, "guidance_scale": 1.5, "eta": 1.0, "timestep_spacing": "trailing"},
    "edit": {"guidance": 2.5, "t_range": [50, 400], "steps": 7, "lr": 0.03},
    "train": {"guidance": 4.0, "t_range": [20, 500]},
}


@pytest.fixture
def settled_teacher_dir(tiny_pixel_teacher_dir, tmp_path):
    """A copy of the tiny pixel teacher that carries SETTINGS."""
    root = tmp_path / "teacher"
    shutil.copytree(tiny_pixel_teacher_dir, root)
    (root / SETTINGS_FILE).write_text(json.dumps(SETTINGS))
    return root


def test_family_table_is_the_installed_pipelines_call_defaults():
    import diffusers

    for cls_name, (_, sampling) in FAMILY_SAMPLING.items():
        params = inspect.signature(getattr(diffusers, cls_name).__call__).parameters
        assert params["num_inference_steps"].default == sampling.num_inference_steps, cls_name
        assert params["guidance_scale"].default == sampling.guidance_scale, cls_name
        if "eta" in params:
            assert params["eta"].default == sampling.eta, cls_name


def test_family_defaults_apply_without_a_settings_file(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    s = load_settings(tmp_path)
    assert (s.sampling.num_inference_steps, s.sampling.guidance_scale) == (50, 5.0)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert load_settings(tmp_path).sampling.guidance_scale == 3.5
    assert load_settings(tmp_path / "nowhere") == TeacherSettings()  # unknown family: ddstrans's defaults


@pytest.mark.parametrize("bad, words", [
    ({"sampling": {"steps": 20}}, "unknown key sampling.steps"),
    ({"edit": {"guidanc": 3}}, "unknown key edit.guidanc"),
    ({"train": {"lr": 0.1}}, "unknown key train.lr"),  # an editing setting, not a training one
    ({"samplers": {}}, "unknown key 'samplers'"),
    ({"sampling": {"num_inference_steps": 0}}, "sampling.num_inference_steps must be a positive integer"),
    ({"sampling": {"eta": "one"}}, "sampling.eta must be a number"),
    ({"sampling": {"timestep_spacing": "even"}}, "sampling.timestep_spacing must be one of"),
    ({"edit": {"t_range": [600, 50]}}, "edit.t_range must be (t_min, t_max)"),
    ({"train": {"weighting": "magic"}}, "train.weighting must be one of"),
    ({"format": "other/2"}, "format must be"),
    ({"sampling": [1]}, "sampling must be an object"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(bad, words):
    with pytest.raises(TeacherSettingsError) as e:
        parse_settings(bad, "t/ddstrans_settings.json")
    assert words in str(e.value) and str(e.value).startswith("t/ddstrans_settings.json: ")
    assert "\n" not in str(e.value)


def test_a_broken_settings_file_fails_the_load_naming_the_file(settled_teacher_dir):
    from ddstrans.teacher import Teacher, TeacherLoadError

    (settled_teacher_dir / SETTINGS_FILE).write_text('{"sampling": {"guidance": 2}}')
    with pytest.raises(TeacherLoadError, match=r"ddstrans_settings.json: unknown key sampling.guidance"):
        Teacher.from_pretrained(settled_teacher_dir)
    (settled_teacher_dir / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(TeacherLoadError, match="not valid JSON"):
        Teacher.from_pretrained(settled_teacher_dir)


def test_teacher_sample_defaults_to_its_settings_and_arguments_win(settled_teacher_dir, monkeypatch, tmp_path):
    import ddstrans.teacher.sd as SD
    from ddstrans.teacher import Teacher

    seen = {}

    def spy_loop(unet, sched, z, emb, uncond, guidance_scale, *, eta, generator):
        seen.update(steps=len(sched.timesteps), guidance=guidance_scale, eta=eta,
                    spacing=sched.config.timestep_spacing)
        return z

    monkeypatch.setattr(SD, "ddim_cfg_loop", spy_loop)
    teacher = Teacher.from_pretrained(settled_teacher_dir, cache_dir=tmp_path / "c")
    teacher.sample(["a photo of a cat"], generator=torch.Generator().manual_seed(0))
    assert seen == {"steps": 3, "guidance": 1.5, "eta": 1.0, "spacing": "trailing"}
    teacher.sample(["a photo of a cat"], num_inference_steps=5, guidance_scale=6.0, eta=0.0, timestep_spacing="leading",
                   generator=torch.Generator().manual_seed(0))
    assert seen == {"steps": 5, "guidance": 6.0, "eta": 0.0, "spacing": "leading"}


def _manifest_generation(out):
    return json.loads((out / "manifest.json").read_text())["generation"]


def test_make_shards_uses_the_teachers_settings_unless_flags_say_otherwise(settled_teacher_dir, tmp_path):
    base = ["make-shards", "from-teacher", "--teacher", str(settled_teacher_dir), "--prompt", "a photo of a cat",
            "--count", "2", "--device", "cpu", "--no-progress"]
    assert main([*base[:2], str(tmp_path / "a"), *base[2:]]) == 0
    g = _manifest_generation(tmp_path / "a")
    assert (g["num_inference_steps"], g["guidance_scale"], g["eta"], g["timestep_spacing"]) == (3, 1.5, 1.0, "trailing")
    assert main([*base[:2], str(tmp_path / "b"), *base[2:], "--steps", "2", "--guidance", "4", "--eta", "0",
                 "--spacing", "leading"]) == 0
    g = _manifest_generation(tmp_path / "b")
    assert (g["num_inference_steps"], g["guidance_scale"], g["eta"], g["timestep_spacing"]) == (2, 4.0, 0.0, "leading")


def test_make_shards_names_a_bad_sampling_flag(settled_teacher_dir, tmp_path, capsys):
    assert main(["make-shards", "from-teacher", str(tmp_path / "o"), "--teacher", str(settled_teacher_dir),
                 "--prompt", "x", "--count", "1", "--eta", "-1", "--no-progress"]) != 0
    assert "--eta must be a number >= 0" in capsys.readouterr().err


def test_edit_config_is_the_teachers_then_the_flags():
    s = parse_settings(SETTINGS)
    cfg = s.edit_config()
    assert (cfg.guidance, cfg.t_range, cfg.steps, cfg.lr) == (2.5, (50, 400), 7, 0.03)
    assert cfg.weighting == Guidance().weighting  # what the teacher leaves alone stays Guidance's
    cfg = s.edit_config(guidance=6.0, steps=None, method="sds")
    assert (cfg.guidance, cfg.steps, cfg.method) == (6.0, 7, "sds")
    assert TeacherSettings().edit_config() == type(cfg)()  # no settings: EditConfig's defaults


def test_ddstrans_edit_reads_the_teachers_edit_settings(settled_teacher_dir, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    import ddstrans.editing as E

    used = []
    real = E.edit_images
    monkeypatch.setattr(E, "edit_images", lambda t, x, s, g, cfg, **kw: used.append(cfg) or real(t, x, s, g, cfg, **kw))
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "in.png")
    base = ["edit", str(tmp_path / "in.png"), "--teacher", str(settled_teacher_dir), "--source", "a photo of a cat",
            "--target", "a photo of a dog", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "a.png")]) == 0
    assert (used[-1].guidance, used[-1].steps, used[-1].t_range) == (2.5, 7, (50, 400))
    assert main([*base, "-o", str(tmp_path / "b.png"), "--steps", "2", "--guidance", "5"]) == 0
    assert (used[-1].guidance, used[-1].steps, used[-1].t_range) == (5.0, 2, (50, 400))


def test_training_takes_the_teachers_train_settings_where_the_config_keeps_the_default(tmp_path):
    from types import SimpleNamespace

    from ddstrans.cli.train import compose, teacher_loss

    teacher = SimpleNamespace(settings=parse_settings(SETTINGS))
    loss = teacher_loss(compose([], tmp_path / "a"), teacher)
    assert loss["guidance"] == 4.0 and loss["t_range"] == [20, 500]
    assert loss["warmup_steps"] == 1000  # loss/dds.yaml's own change stays
    loss = teacher_loss(compose(["loss.guidance=6.0", "loss.t_range=[100,900]"], tmp_path / "b"), teacher)
    assert loss["guidance"] == 6.0 and loss["t_range"] == [100, 900]  # the config wins
    plain = teacher_loss(compose([], tmp_path / "c"), SimpleNamespace(settings=TeacherSettings()))
    assert plain["guidance"] == Guidance().guidance


def test_the_shipped_shapes_teacher_carries_its_card_settings():
    from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE, shapes_teacher_path

    s = load_settings(shapes_teacher_path())
    assert (s.sampling.num_inference_steps, s.sampling.guidance_scale, s.sampling.eta) == (20, 2.0, 1.0)
    cfg = s.edit_config()
    assert cfg.guidance == SHAPES_EDIT_GUIDANCE and cfg.t_range == (50, 600)
    assert dict(s.train) == {}  # translators train at the reference settings (experiment=shapes)
