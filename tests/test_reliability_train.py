"""Reliability of training runs (docs/reliability.md): one run per run directory, nothing written before the
config is valid, divergence never reported as success, exact resume, one-line errors, counted skipped samples."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ddstrans.cli.train import compose, run_reporting_errors, train
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule, NonFiniteLossError
from ddstrans.scores import ScoreInfo

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)


def _app():
    exe = Path(sys.executable).with_name("ddstrans-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ddstrans.cli.train"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DDSTRANS_DEBUG", None)
    return env


def _run(args, cwd, timeout=180):
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------------- 3/4/12. run directory lock, no early writes
def _hydra_main(monkeypatch, args: list[str]) -> int:
    """``ddstrans-train ARGS`` in this process (Hydra's own start-up included); returns the exit status."""
    import logging

    from ddstrans.cli.train import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(sys, "argv", ["ddstrans-train", *args])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    finally:  # Hydra configures logging for its run: leave the process's logging as it was
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
    return 0


def test_a_run_directory_in_use_is_refused_and_a_rejected_resume_writes_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    base = ["experiment=smoke", f"hydra.run.dir={run}", *QUIET, "trainer.val_check_interval=100000",
            "callbacks.model_checkpoint.every_n_train_steps=2"]
    first = subprocess.Popen([*_app(), *base, "trainer.max_steps=100000"], cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (run / "checkpoints" / "last.ckpt").is_file():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.time() - t0 < 180
            time.sleep(0.2)
        overrides = (run / ".hydra" / "overrides.yaml").read_bytes()
        assert _hydra_main(monkeypatch, [*base, "trainer.max_steps=4"]) == 2
        err = _error_lines(capsys.readouterr().err)
        assert err and f"in use by pid {first.pid}" in err[0]
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides
    finally:
        first.kill()  # kill -9: its lock stays behind, stale
        first.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == first.pid
    # a rejected resume (bad value) changes nothing in the run directory
    assert _hydra_main(monkeypatch, [*base, "ckpt_path=last", "optim.lr=-1"]) == 2
    assert "optim.lr=-1" in _error_lines(capsys.readouterr().err)[0]
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides
    # the deliberate resume takes the stale lock over and removes temp files of killed checkpoint saves
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    planted = run / "checkpoints" / ".last.ckpt.tmp-999999"
    planted.write_bytes(b"half a checkpoint")
    assert _hydra_main(monkeypatch, [*base, "ckpt_path=last", f"trainer.max_steps={step + 1}"]) == 0
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not planted.exists() and not (run / "run.lock").exists()
    assert "ckpt_path=last" in (run / ".hydra" / "overrides.yaml").read_text()


def test_run_lock_is_refused_in_process_while_held_and_released_after(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
    try:
        with pytest.raises(SystemExit) as e:
            run_reporting_errors(compose(["experiment=smoke", *QUIET, "trainer.max_steps=1"], run))
        assert e.value.code == 2 and f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------- 9. divergence is a failure, never a "best" value
def test_a_diverged_run_fails_instead_of_reporting_a_perfect_metric(tmp_path):
    # every score entry of a diverged generator is non-finite: formerly zeroed, loss 0, val/dds_norm 0.0, exit 0
    with pytest.raises(NonFiniteLossError, match="diverged"):  # a sweep (Optuna) sees a failed trial, no value
        train(compose(["experiment=smoke", *QUIET, "optim.lr=1e30", "trainer.max_steps=3"], tmp_path / "run"))
    rows = list(csv.DictReader(open(next((tmp_path / "run").glob("csv/*/metrics.csv")))))
    vals = [float(r["val/dds_norm"]) for r in rows if r.get("val/dds_norm")]
    assert vals and not np.isfinite(vals[-1])  # never the 0.0 of zeroed scores
    assert float([r["train/skipped_steps"] for r in rows if r.get("train/skipped_steps")][-1]) >= 1


def test_in_a_sweep_a_failing_job_raises_for_the_sweeper(tmp_path, capsys):
    from ddstrans.validation import ConfigError

    cfg = compose(["experiment=smoke", *QUIET, "optim.lr=-1", "hydra.mode=MULTIRUN"], tmp_path / "run")
    with pytest.raises(ConfigError):  # not SystemExit: the sweeper records the job (Optuna trial) as failed
        run_reporting_errors(cfg)
    assert _error_lines(capsys.readouterr().err)


def test_nonfinite_score_entries_count_as_nonfinite_steps(tiny_teacher, tmp_path):
    from ddstrans.data.procedural import ProceduralDataModule

    torch.manual_seed(0)
    m = DDSTranslationModule(tiny_teacher, [{"name": "a", "source": "a cat", "target": "a dog"}],
                             functools.partial(build_generator, **TINY), validation={"num_images": 0},
                             loss={"max_consecutive_nonfinite": 3})

    def score(self, z_src, z_tgt, *a, **k):  # zeroed entries (the score of a diverged latent): loss reads 0
        return torch.zeros_like(z_tgt), ScoreInfo(torch.tensor(5), torch.zeros(len(z_tgt)), z_tgt)

    m.score = score.__get__(m)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=8))


# ---------------------------------------------------------------------- 11. exact resume
def _losses(run: Path) -> dict[int, float]:
    out = {}
    for f in sorted(run.glob("csv/*/metrics.csv")):
        out.update({int(r["step"]): float(r["train/loss_dds"]) for r in csv.DictReader(open(f)) if r.get("train/loss_dds")})
    return out


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # 4 batches per epoch, cut at step 5: the resume starts mid-epoch, in the second epoch
    base = ["experiment=smoke", *QUIET, "data.num_train=8", "trainer.val_check_interval=100",
            "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.max_steps=10"]
    train(compose(base, tmp_path / "full"))
    train(compose([*base, "trainer.max_steps=5"], tmp_path / "cut"))
    train(compose([*base, "ckpt_path=last"], tmp_path / "cut"))
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(10))
    np.testing.assert_allclose([cut[s] for s in range(5, 10)], [full[s] for s in range(5, 10)], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------- 12. one line for every user error
@pytest.mark.parametrize("overrides, match", [
    (["optim.lr=abc"], "optim.lr=abc: must be a number"),
    (["data.image_size=0"], "data.image_size=0: must be >= 1"),
    (["data.num_train=1"], "data.num_train=1 is smaller than one batch"),
    (["data=shards"], "data.urls is required"),
    (["data=shards", "data.urls=."], "data (ddstrans.data.shards.ShardDataModule)"),
])
def test_bad_values_are_one_error_line(overrides, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(compose(["experiment=smoke", *QUIET, *overrides], tmp_path / "run"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and match in err and "Traceback" not in err


def _broken_teacher(tiny_teacher_dir, tmp_path, how):
    import shutil

    d = tmp_path / how
    shutil.copytree(tiny_teacher_dir, d)
    if how == "truncated":
        w = next((d / "unet").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:3000])
    else:
        (d / "vae" / "config.json").unlink()
    return str(d)


@pytest.mark.parametrize("how", ["truncated", "no_vae_config", "hub_id_offline"])
def test_teacher_load_errors_are_one_error_line_exit_2(how, tiny_teacher_dir, tmp_path, capsys):
    name = "nobody/no-such-model" if how == "hub_id_offline" else _broken_teacher(tiny_teacher_dir, tmp_path, how)
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(compose(["experiment=smoke", *QUIET, "teacher=local", f"teacher.path_or_hub_id={name}"],
                                     tmp_path / "run"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(_error_lines(err)) == 1 and "Error in call to target" not in err


@pytest.mark.parametrize("exc, code, match", [
    (OSError(errno.EACCES, "Permission denied", "/x/y"), 1, "error: Permission denied: /x/y"),
    ("safetensors", 2, "error: a safetensors file could not be read"),
])
def test_os_and_safetensors_errors_are_one_line(exc, code, match, tmp_path, capsys, monkeypatch):
    import ddstrans.cli.train as app

    if exc == "safetensors":
        from safetensors import SafetensorError

        exc = SafetensorError("Error while deserializing header: HeaderTooLarge")

    def boom(cfg, teacher=None):
        raise exc

    monkeypatch.setattr(app, "build_module", boom)
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(compose(["experiment=smoke", *QUIET], tmp_path / "run"))
    err = capsys.readouterr().err
    assert e.value.code == code and _error_lines(err) == [err.strip()] and err.startswith(match)


class _FullDiskOS:
    """``os`` as ddstrans.callbacks sees it, with ``fsync`` failing like a full disk while ``armed``."""

    armed = False

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        if self.armed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.fsync(fd)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_last_ckpt(tmp_path, capsys, monkeypatch):
    import ddstrans.callbacks as cb

    fake = _FullDiskOS()
    real_save = cb.AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        fake.armed = checkpoint.get("global_step", 0) >= 6
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(cb, "os", fake)
    monkeypatch.setattr(cb.AtomicCheckpointIO, "save_checkpoint", save)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(compose(["experiment=smoke", *QUIET], run))
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith(f"error: no space left on {run / 'checkpoints'}")
    assert "Traceback" not in err
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and not list((run / "checkpoints").glob(".*tmp*"))


# ---------------------------------------------------------------------- 13. skipped samples are counted
def test_nonfinite_shard_samples_are_skipped_and_counted(tiny_teacher, tmp_path):
    import webdataset as wds

    from ddstrans.data.shards import ShardStream

    good = np.zeros((4, 8, 8), np.float32)
    members = [good, np.full_like(good, np.nan), good, good.copy(), np.full_like(good, np.inf), good]

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        for i, a in enumerate(members):
            w.write({"__key__": f"{i:04d}", "latents.npy": npy(a), "txt": "a cat"})
    stream = ShardStream([str(tmp_path / "s-000000.tar")], resolution=16, batch_size=2, batches_per_epoch=2,
                         resampled=False, shuffle_buffer=0, use_latents=True, latent_shape=(4, 8, 8))
    batches = list(stream)
    assert len(batches) == 2 and sum(int(b["skipped_samples"]) for b in batches) == 2

    torch.manual_seed(0)
    m = DDSTranslationModule(tiny_teacher, [{"name": "a", "source": "a cat", "target": "a dog"}],
                             functools.partial(build_generator, **TINY), validation={"num_images": 0})
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(m, train_dataloaders=loader)
    assert m.skipped_samples == 2 and float(trainer.callback_metrics["train/skipped_samples"]) == 2.0
