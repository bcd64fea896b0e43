"""Every Hydra config composes (in the manner of lightning-hydra-template), and its parts instantiate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from ddstrans.cli.train import CONFIG_PATH, compose

CONFIGS = Path(CONFIG_PATH)
GROUPS = ["teacher", "generator", "tasks", "data", "loss", "optim", "trainer", "logger", "callbacks", "experiment",
          "hparams_search", "debug", "paths", "hydra"]
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_config_dir_has_every_group():
    for g in GROUPS:
        assert (CONFIGS / g).is_dir(), g
    assert {"smoke", "sd15_cat2animals"} <= set(EXPERIMENTS)
    assert {"cpu", "gpu", "ddp", "slurm"} <= set(_options("trainer"))
    assert {"wandb", "csv", "tensorboard", "none"} <= set(_options("logger"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS if g not in ("hydra", "paths")
                                      for o in _options(g)])
def test_every_group_option_composes(override, tmp_path):
    extra = ["teacher.path_or_hub_id=/nonexistent"] if override == "teacher=local" else []
    cfg = compose([override, *extra], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.paths.output_dir == str(tmp_path.resolve())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_and_parts_instantiate(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.tasks.tasks and all({"name", "source", "target"} <= set(t) for t in cfg.tasks.tasks)
    assert callable(hydra.utils.instantiate(cfg.generator))
    assert callable(hydra.utils.instantiate(cfg.optim.optimizer))
    if cfg.data._target_.endswith("ProceduralDataModule"):
        hydra.utils.instantiate(cfg.data)
    assert str(cfg.callbacks.model_checkpoint.dirpath).startswith(str(tmp_path.resolve()))
    shared = cfg.loss.get("shared_noise_tasks")  # the module rejects names that are not tasks of the run
    assert not shared or set(shared) <= {t.name for t in cfg.tasks.tasks}
    if cfg.loss.get("t_range_end") is not None:  # an anneal reaches its end by the last step, not after
        assert 0 < cfg.loss.t_range_steps <= cfg.trainer.max_steps


def test_sd15_experiment_is_the_paper_setup(tmp_path):
    cfg = compose(["experiment=sd15_cat2animals", "teacher.path_or_hub_id=/data/sd15"], tmp_path)
    assert cfg.teacher.path_or_hub_id == "/data/sd15"
    assert [t.name for t in cfg.tasks.tasks] == ["cat2lion", "cat2dog", "cat2squirrel"]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.loss.guidance_start < cfg.loss.guidance and cfg.loss.warmup_steps > 0


def test_smoke_with_ddp_trainer_override(tmp_path):
    cfg = compose(["experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"], tmp_path)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.max_steps == 6 and cfg.trainer.precision == "32-true"
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.num_devices == 2


def test_slurm_launcher_and_optuna_compose(tmp_path):
    cfg = compose(["trainer=slurm", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["nodes"] == cfg.trainer.num_nodes == 2
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8
    assert "submitit" in launcher["_target_"].lower()
    cfg = compose(["hparams_search=optuna", "experiment=smoke"], tmp_path)
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert cfg.optimized_metric == "val/dds_norm" and "optim.lr" in cfg.hydra.sweeper.params


def test_configs_found_from_any_directory(tmp_path):
    """The console script finds configs/ relative to the package, not the working directory."""
    exe = Path(sys.executable).with_name("ddstrans-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ddstrans.cli.train"]
    out = subprocess.run([*cmd, "--cfg", "job", "experiment=smoke"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "task_name: smoke" in out.stdout


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


IGNORED = ("task_name", "tags", "paths.", "hydra.", "logger.")  # what every experiment sets for itself


def _flat_experiment(name: str, tmp_path, resolve: bool = False) -> dict:
    return _flat(OmegaConf.to_container(compose([f"experiment={name}"], tmp_path / "a"), resolve=resolve))


def _differences(base: dict, other: dict) -> dict:
    """``other``'s value of every key where it differs from ``base``, beyond what every experiment sets for itself."""
    return {k: other.get(k) for k in set(base) | set(other)
            if base.get(k) != other.get(k) and not k.startswith(IGNORED)}


@pytest.mark.parametrize("experiment,expected", [
    ("shapes_no_warmup", {"loss.warmup_steps": 0}),
    ("shapes_sds", {"loss.method": "sds"}),
    ("shapes_text", {"generator.conditioning": "text"}),
    ("shapes_no_ema", {"optim.ema.enabled": False}),
    ("shapes_no_identity", {"loss.identity_weight": 0.0}),
])
def test_ablation_experiments_change_only_their_switch(experiment, expected, tmp_path):
    """Each ablation row of bench_quality differs from experiment=shapes in exactly its one switch."""
    assert _differences(_flat_experiment("shapes", tmp_path), _flat_experiment(experiment, tmp_path)) == expected


def test_shapes_stops_at_its_step_count_not_at_its_time_limit(tmp_path):
    """The main job's training ends at max_steps: its max_time leaves room for 1,200 steps at 1 step/s three times
    over (a machine half as fast as 2 cores at 2 steps/s still finishes every step)."""
    cfg = compose(["experiment=shapes"], tmp_path / "a")
    days, hours, minutes, seconds = (int(x) for x in str(cfg.trainer.max_time).split(":"))
    limit_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    assert cfg.trainer.max_steps == 1200
    assert limit_s >= 3 * cfg.trainer.max_steps / 1.0


def test_long_palette_is_shapes_long_plus_a_late_palette_term(tmp_path):
    """experiment=shapes_long_palette changes shapes_long only in the palette term, the identity term's tasks and the
    step count: its first 2,000 steps differ from shapes_long's only in the identity term's tasks."""
    base = _flat_experiment("shapes_long", tmp_path, resolve=True)
    pal = _flat_experiment("shapes_long_palette", tmp_path, resolve=True)
    assert _differences(base, pal) == {"loss.identity_tasks": ["to_blue", "to_red", "to_yellow", "to_square"],
                    "loss.palette_weight": 1.0, "loss.palette_tasks": ["to_checkered"], "loss.palette_start": 2000,
                    "loss.palette_ramp_steps": 1000, "trainer.max_steps": 3000}
    assert pal["loss.t_range_steps"] == base["loss.t_range_steps"] == 2000  # the same anneal in both


def test_unseen_experiment_trains_four_color_pairs_with_text_conditioning(tmp_path):
    cfg = compose(["experiment=shapes_unseen"], tmp_path)
    assert [t.name for t in cfg.tasks.tasks] == ["red_to_blue", "blue_to_red", "green_to_yellow", "yellow_to_green"]
    assert cfg.generator.conditioning == "text"


def test_unseen_many_trains_eight_pairs_and_none_of_the_held_out_ones(tmp_path):
    """Every held-out pair must be a new combination of a trained source color and a trained target color."""
    from collections import Counter

    cfg = compose(["experiment=shapes_unseen_many"], tmp_path)
    pairs = [tuple(t.name.split("_to_")) for t in cfg.tasks.tasks]
    assert len(set(pairs)) == 8 and cfg.generator.conditioning == "text"
    held_out = {("red", "yellow"), ("green", "blue"), ("blue", "green"), ("yellow", "red")}
    assert not held_out & set(pairs)
    assert set(Counter(s for s, _ in pairs).values()) == {2} and set(Counter(t for _, t in pairs).values()) == {2}
    for t in cfg.tasks.tasks:  # the rewrite matches the name
        s, d = t.name.split("_to_")
        assert t.rewrite.pattern == rf"\b{s}\b" and t.rewrite.replacement == d


@pytest.mark.parametrize("tasks", ["shapes_zero_shot", "shapes_zero_shot_varied"])
def test_zero_shot_experiment_never_trains_a_held_out_pair_or_two_changes_at_once(tasks, tmp_path):
    """No training task turns a held-out pair's source color into its target color, each held-out pair's colors
    are a trained source and a trained target, and no training task changes two attributes of any scene (also with
    the more varied task set of the bench's design ``varied``)."""
    from ddstrans.shapes.evaluation import changed_attributes
    from ddstrans.shapes.world import all_captions, parse_caption
    from ddstrans.tasks import as_tasks

    cfg = compose(["experiment=shapes_zero_shot", f"tasks={tasks}"], tmp_path)
    assert cfg.generator.conditioning == "text" and cfg.generator.text_mode == "changed"
    tasks = as_tasks(OmegaConf.to_container(cfg.tasks.tasks, resolve=True))
    trained = set()
    for t in tasks:
        for c in all_captions():
            changed = changed_attributes(t, c)
            assert len(changed) <= 1, (t.name, c)
            if changed == ("color",):
                trained.add((parse_caption(c)["color"], parse_caption(t.target_for(c))["color"]))
    held_out = {("red", "yellow"), ("green", "blue"), ("blue", "green"), ("yellow", "red")}
    assert len(trained) == 8 and not trained & held_out
    assert all(any(s == a for a, _ in trained) and any(d == b for _, b in trained) for s, d in held_out)


def test_long_sharp_is_shapes_long_with_a_late_lower_guidance(tmp_path):
    """experiment=shapes_long_sharp is shapes_long run on to 3,500 steps: the same anneal, and the low-noise guidance
    (every sample after the anneal) lowered to 1.5 from step 3,000 only."""
    base = _flat_experiment("shapes_long", tmp_path, resolve=True)
    sharp = _flat_experiment("shapes_long_sharp", tmp_path, resolve=True)
    assert _differences(base, sharp) == {"loss.guidance_low": 1.5, "loss.guidance_low_from_step": 3000,
                                         "trainer.max_steps": 3500}
    assert sharp["loss.t_range_steps"] == base["loss.t_range_steps"] == 2000
    assert tuple(sharp["loss.t_range_end"]) == (10, 150) and sharp["loss.guidance_low_t"] == 150


def test_zero_shot_sharp_is_shapes_zero_shot_with_a_late_lower_guidance(tmp_path):
    """experiment=shapes_zero_shot_sharp is shapes_zero_shot run on to 4,000 steps with the same anneal; guidance 1.5
    covers every sample after it (t < 300) from step 3,000 only."""
    base = _flat_experiment("shapes_zero_shot", tmp_path, resolve=True)
    sharp = _flat_experiment("shapes_zero_shot_sharp", tmp_path, resolve=True)
    assert _differences(base, sharp) == {"loss.guidance_low_t": 300, "loss.guidance_low": 1.5,
                                         "loss.guidance_low_from_step": 3000, "trainer.max_steps": 4000}
    assert sharp["loss.t_range_steps"] == base["loss.t_range_steps"] == 2000
    assert sharp["loss.t_range_end"][1] <= sharp["loss.guidance_low_t"]  # after the anneal every sample is at 1.5


def test_zero_shot_low_lr_is_zero_shot_sharp_plus_a_last_phase(tmp_path):
    """experiment=shapes_zero_shot_low_lr is shapes_zero_shot_sharp up to step 4,000 (the same schedule factor
    before it), then a tenth of the learning rate, 3 batches per optimizer step and t in [10, 150) for 250 steps."""
    sharp = _flat_experiment("shapes_zero_shot_sharp", tmp_path, resolve=True)
    low = _flat_experiment("shapes_zero_shot_low_lr", tmp_path, resolve=True)
    assert _differences(sharp, low) == {
        "loss.t_range_late": [10, 150], "loss.t_range_late_from_step": 4000,
        "optim.scheduler._target_": "ddstrans.lr_schedules.with_step_decay", "optim.scheduler.milestones": [4000],
        "optim.scheduler.gamma": 0.1, "callbacks.step_grad_accumulation._target_":
            "ddstrans.accumulation.StepGradAccumulation", "callbacks.step_grad_accumulation.scheduling.4000": 3,
        "trainer.max_steps": 4250}
    import torch
    from diffusers.optimization import get_scheduler

    from ddstrans.lr_schedules import with_step_decay

    kw = {k.removeprefix("optim.scheduler."): v for k, v in sharp.items()
          if k.startswith("optim.scheduler.") and not k.endswith("_")}  # name, num_warmup_steps
    before = get_scheduler(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), **kw)
    after = with_step_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), milestones=[4000],
                            gamma=0.1, **kw)
    assert [after.lr_lambdas[0](s) for s in (0, 10, 3999)] == [before.lr_lambdas[0](s) for s in (0, 10, 3999)]
    assert after.lr_lambdas[0](4000) == pytest.approx(0.1 * before.lr_lambdas[0](4000))


def test_square_is_shapes_long_to_step_3000_then_its_phases(tmp_path):
    """experiment=shapes_square is shapes_long up to step 3,000 (the same warm-up to guidance 3 and anneal; as in
    shapes_long_sharp, low-noise samples follow the warm-up too); from there every sample is at guidance 1.5, 48
    samples per optimizer step, and the timestep range follows the five phases, the learning rate a tenth from the
    second on, a quarter of the samples at very low noise in the last, the identity term three times as strong in
    the low-noise phases."""
    from ddstrans.guidance import Guidance

    base = _flat_experiment("shapes_long", tmp_path, resolve=True)
    square = _flat_experiment("shapes_square", tmp_path, resolve=True)
    assert set(_differences(base, square)) == {
        "loss.guidance_low_t", "loss.guidance_low", "loss.guidance_low_from_step", "loss.guidance_low_tasks",
        "loss.t_range_phases", "loss.t_range_mix", "loss.t_range_mix_prob", "loss.t_range_mix_from_step",
        "loss.identity_weight_phases", "optim.scheduler._target_", "optim.scheduler.milestones", "optim.scheduler.gamma",
        "callbacks.step_grad_accumulation._target_", "callbacks.step_grad_accumulation.scheduling.3000",
        "trainer.max_steps"}
    assert square["loss.t_range_steps"] == 2000 == base["trainer.max_steps"]  # shapes_long's own anneal length
    loss = OmegaConf.to_container(compose(["experiment=shapes_square"], tmp_path / "c").loss, resolve=True)
    long_ = Guidance.from_mapping(OmegaConf.to_container(compose(["experiment=shapes_long"], tmp_path / "l").loss,
                                                         resolve=True)).replace(t_range_steps=2000)
    g = Guidance.from_mapping(loss)
    for step in (0, 1000, 2000, 2999):  # shapes_long's schedule: range and guidance per timestep
        assert g.t_range_at(step) == long_.t_range_at(step)
        assert g.guidance_low_t_at(step) == 0 and g.scale_at(step) == long_.scale_at(step)
    assert g.scale_at(1000) == 3.0
    assert [g.t_range_at(s) for s in (3000, 3624, 3625, 4124, 4125, 4224, 4225, 4399, 4400, 4599)] == [
        (50, 600), (50, 600), (10, 300), (10, 300), (5, 50), (5, 50), (10, 300), (10, 300), (50, 600), (50, 600)]
    assert (g.t_range_mix, g.t_range_mix_prob, g.t_range_mix_from_step) == ((5, 50), 0.25, 4400)
    assert g.guidance_low_t_at(3000) == 1000 and g.guidance_low == 1.5  # every t of every phase at 1.5 ...
    assert set(g.guidance_low_tasks) == {"to_blue", "to_red", "to_yellow", "to_square"}  # ... but the checkers' at 3
    assert square["optim.scheduler.milestones"] == [3625] and square["trainer.max_steps"] == 4800
    assert base["loss.identity_weight"] == square["loss.identity_weight"] == 0.1  # shapes_long's, three times it
    assert square["loss.identity_weight_phases"] == [[4125, 0.3], [4400, 0.1]]  # in the low-noise phases
