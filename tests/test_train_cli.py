"""The Hydra app: offline experiments smoke-run, resume from `last`, multirun sweeps (also with DDP), Optuna."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddstrans.cli.train import CONFIG_PATH, compose, train

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_PATH) / "experiment").glob("*.yaml"))
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]


def _runs_offline(cfg) -> bool:
    from ddstrans.shapes.defaults import shapes_teacher_path

    t = cfg.teacher
    if t._target_.endswith("load_shapes_teacher"):
        return (shapes_teacher_path() / "unet").is_dir()
    return t._target_.endswith("tiny_random_teacher") or Path(str(t.get("path_or_hub_id", ""))).is_dir()


# Stand-ins for experiments whose teacher/data/hardware are not here (Stable Diffusion on GPUs): everything
# else of the experiment (generator, tasks, loss, optimizer, callbacks) is still composed and run.
STAND_INS = ["teacher=tiny_random", "data.resolution=16", "data.num_workers=0", "data.batch_size=2",
             "data.val_samples=2", "trainer=cpu", "trainer.precision=32-true", "logger=csv"]


def _tiny_shards(tmp_path) -> str:
    """A few 24x24 images written as webdataset shards (the stand-in for an experiment's real data)."""
    from PIL import Image

    from ddstrans.data.writer import write_from_folder

    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8")).save(src / f"{i}.png")
    write_from_folder(src, tmp_path / "shards", min_size=8, maxcount=4, progress=False)
    return str(tmp_path / "shards")


def _cmd():
    exe = Path(sys.executable).with_name("ddstrans-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ddstrans.cli.train"]


def run_app(args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    out = subprocess.run([*_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out, time.time() - t0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_offline_experiments_smoke_run(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}", *QUIET], tmp_path / "run")
    stand_ins = []
    if not _runs_offline(cfg):
        uses_shards = cfg.data._target_.endswith("ShardDataModule")
        stand_ins = [*STAND_INS, f"data.urls={_tiny_shards(tmp_path)}"] if uses_shards else STAND_INS
    cfg = compose([f"experiment={experiment}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "callbacks.model_checkpoint.every_n_train_steps=2", "export_after_fit=false", *stand_ins, *QUIET],
                  tmp_path / "run")
    metric = train(cfg)
    assert metric is not None and metric == metric  # finite float returned for Optuna
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "run" / "val").glob("*.png"))


@pytest.mark.parametrize("variant", [
    ["trainer.precision=bf16-mixed", "model.teacher_dtype=bfloat16"],  # mixed precision, half-precision teacher
    ["generator=tiny_text", "loss=sds", "logger=tensorboard"],
    ["generator.gradient_checkpointing=true", "optim=sgd", "logger=none", "callbacks=none"],
])
def test_config_variants_train(variant, tmp_path):
    cfg = compose(["experiment=smoke", "trainer.max_steps=2", "trainer.val_check_interval=2", *QUIET, *variant],
                  tmp_path / "run")
    assert train(cfg) is not None


def test_resume_from_last_continues_step_optimizer_and_ema_with_the_new_config(tmp_path):
    run = tmp_path / "run"
    base = ["experiment=smoke", "callbacks.model_checkpoint.every_n_train_steps=2", *QUIET]
    train(compose([*base, "trainer.max_steps=4"], run))
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 4
    assert first["ema"]["decay"] != 0.5
    # a resumed run follows its own optim.ema, not the decay the checkpoint's EMA was saved with
    train(compose([*base, "trainer.max_steps=6", "ckpt_path=last", "optim.ema.decay=0.5"], run))
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 6
    assert ck["ema"]["decay"] == 0.5
    assert float(ck["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam state carried over, not restarted
    assert ck["ema"]["optimization_step"] == 6
    assert ck["lr_schedulers"][0]["last_epoch"] == 6


def test_a_run_cut_by_max_time_says_so_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["experiment=smoke", "callbacks.model_checkpoint.every_n_train_steps=1", *QUIET]
    train(compose([*base, "trainer.max_steps=100000", "trainer.max_time=00:00:00:01"], run))
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 100000
    err = capsys.readouterr().err
    assert f"training stopped at step {step} of trainer.max_steps=100000" in err
    cont = err.split("To finish: ")[1].split()[:3]  # the overrides it suggests, as given
    assert cont == ["ckpt_path=last", f"hydra.run.dir={run}", "trainer.max_time=null"]
    train(compose([*base, f"trainer.max_steps={step + 2}", *cont[:1], *cont[2:]], run))  # compose takes the run dir
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2
    assert "training stopped" not in capsys.readouterr().err  # a run that reaches max_steps says nothing


def test_ckpt_path_last_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        train(compose(["experiment=smoke", "ckpt_path=last", *QUIET], tmp_path / "fresh"))


@pytest.mark.slow
def test_smoke_cli_under_a_minute(tmp_path):
    out, seconds = run_app(["experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    run = tmp_path / "run"
    assert seconds < 60, seconds
    assert (run / ".hydra" / "config.yaml").is_file()  # Hydra's config + overrides in every run dir
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(run.resolve()) and "${" not in (run / "config_resolved.yaml").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "val").glob("step_*.png"))) == 2
    assert list(run.glob("csv/version_*/metrics.csv"))


@pytest.mark.slow
def test_multirun_sweep_writes_two_run_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    run_app(["-m", "experiment=smoke", "optim.lr=1e-4,3e-4", "trainer.max_steps=2", "trainer.val_check_interval=2",
             f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = set()
    for j in jobs:
        assert (j / "checkpoints" / "last.ckpt").is_file()
        lrs.add(yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["optim"]["lr"])
    assert lrs == {1e-4, 3e-4}


@pytest.mark.slow
@pytest.mark.ddp
def test_multirun_with_ddp_runs_each_job_once(tmp_path):
    """The Hydra-multirun + Lightning-DDP trap: children must run their own job, not the sweep again."""
    sweep = tmp_path / "sweep"
    run_app(["-m", "experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
             "optim.lr=1e-4,3e-4", "trainer.max_steps=2", "trainer.val_check_interval=2",
             f"hydra.sweep.dir={sweep}"], tmp_path, timeout=300)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]  # no extra sweeps launched by the DDP children
    for j in jobs:
        ck = torch.load(sweep / j / "checkpoints" / "last.ckpt", weights_only=False)
        assert ck["global_step"] == 2
        assert (sweep / j / "train_ddp_process_1.log").is_file()  # rank 1 ran inside this job's directory
    assert not (tmp_path / "logs").exists()  # nothing escaped into a default run dir


@pytest.mark.slow
def test_optuna_search_optimises_returned_metric(tmp_path):
    sweep = tmp_path / "optuna"
    run_app(["hparams_search=optuna", "experiment=smoke", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
             f"hydra.sweep.dir={sweep}"], tmp_path)
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "optim.lr" in res["best_params"] and isinstance(res["best_value"], float)


def test_export_after_fit_writes_translator_under_checkpoint_dir(tmp_path):
    from ddstrans.translator import Translator

    cfg = compose(["experiment=smoke", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "callbacks.model_checkpoint.every_n_train_steps=2", "export_after_fit=true",
                   f"paths.checkpoint_dir={tmp_path / 'exported'}", *QUIET], tmp_path / "run")
    train(cfg)
    (out,) = list((tmp_path / "exported").iterdir())
    assert out.name.startswith("smoke-")
    tr = Translator.from_pretrained(out)
    assert tr.tasks == ["cat2lion", "cat2dog"] and tr.info["training"]["global_step"] == 2
    assert "task_name: smoke" in (out / "README.md").read_text()


def test_progress_bar_flag_alone_silences_the_run(tmp_path):
    """`trainer.enable_progress_bar=false` without removing the progress-bar callback: Lightning alone refuses."""
    cfg = compose(["experiment=smoke", "trainer.max_steps=1", "trainer.val_check_interval=1",
                   "trainer.enable_progress_bar=false"], tmp_path / "run")
    assert train(cfg) is not None


def test_resume_keeps_one_last_checkpoint(tmp_path):
    """A run whose last.ckpt came from the end-of-training save (not from ModelCheckpoint) resumes and writes
    last.ckpt itself: no last-v1.ckpt beside an older last.ckpt that a later resume would pick up."""
    run = tmp_path / "run"
    base = ["experiment=smoke", "callbacks.model_checkpoint.every_n_train_steps=4", *QUIET]
    train(compose([*base, "trainer.max_steps=2"], run))
    train(compose([*base, "trainer.max_steps=4", "ckpt_path=last"], run))
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
