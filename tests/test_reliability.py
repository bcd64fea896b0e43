"""Reliability: crash-safe training and resume, SIGTERM, atomic checkpoints, non-finite streaks, config
validation before heavy work, bad input files, safe loading. One test (or more) per row of docs/reliability.md."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.callbacks import AtomicCheckpointIO, SaveLastCheckpoint, atomic_torch_save
from ddstrans.cli.main import main as cli
from ddstrans.cli.train import checkpoint_io_plugins, compose, run_reporting_errors, train
from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.export import ExportError, export_checkpoint, load_training_checkpoint
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule, NonFiniteLossError
from ddstrans.schedules import guidance_at
from ddstrans.scores import ScoreInfo
from ddstrans.teacher import Teacher
from ddstrans.translator import Translator, TranslatorLoadError
from ddstrans.validation import ConfigError, validate_config

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


# ---------------------------------------------------------------------- helpers
def _app():
    exe = Path(sys.executable).with_name("ddstrans-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ddstrans.cli.train"]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DDSTRANS_DEBUG", None)
    env.update(extra)
    return env


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout}s")
        time.sleep(0.2)


def _long_run(run: Path, *extra: str, max_steps: int = 100000, every: int = 3) -> list[str]:
    return [*_app(), "experiment=smoke", f"hydra.run.dir={run}", *QUIET, f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=100000", f"callbacks.model_checkpoint.every_n_train_steps={every}",
            "loss.warmup_steps=400", *extra]


def _guidance_rows(run: Path) -> list[tuple[int, float]]:
    rows = []
    for f in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            for r in csv.DictReader(fh):
                if r.get("train/guidance"):
                    rows.append((int(r["step"]), float(r["train/guidance"])))
    return rows


# ---------------------------------------------------------------------- 1. crash-safe training
@pytest.mark.slow
def test_sigkill_then_resume_continues_step_optimizer_ema_schedule_and_warmup(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_long_run(run), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(last, proc)
        time.sleep(1.5)  # a few more steps (and likely another save) before the kill
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    ck = _load(last)  # the kill never leaves a broken last.ckpt (atomic writes)
    step = ck["global_step"]
    assert step >= 3 and step % 3 == 0
    gen0 = {k: v.clone() for k, v in ck["state_dict"].items()}

    extra = 4
    out = subprocess.run([*_long_run(run, "ckpt_path=last", max_steps=step + extra)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    end = _load(last)
    assert end["global_step"] == step + extra  # continued from the checkpoint's step, not from 0
    assert float(end["optimizer_states"][0]["state"][0]["step"]) == step + extra  # Adam moments carried over
    assert end["lr_schedulers"][0]["last_epoch"] == step + extra  # LR schedule position
    assert end["ema"]["optimization_step"] == step + extra  # EMA continued
    assert end["ddstrans"]["run_config"]["loss"]["warmup_steps"] == 400
    for k, v in end["state_dict"].items():
        assert torch.isfinite(v).all(), k
    assert any(not torch.equal(v, gen0[k]) for k, v in end["state_dict"].items())
    shadow = end["ema"]["shadow_params"]
    assert all(torch.isfinite(s).all() for s in shadow)
    # CFG warm-up is a function of global_step: the resumed run logs the guidance of steps > the checkpoint's
    # (ramping from 1.0 to 7.5 over 400 steps), not a restarted warm-up
    resumed = [(s, g) for s, g in _guidance_rows(run) if s >= step]
    assert resumed, _guidance_rows(run)
    s, g = resumed[0]
    assert g == pytest.approx(guidance_at(s, 7.5, 1.0, 400, "linear"), abs=1e-4)
    assert g > guidance_at(step - 1, 7.5, 1.0, 400, "linear") - 1e-6 > 1.0


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_then_exits_143(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_long_run(run, every=5), cwd=tmp_path,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(last, proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("preempted (SIGTERM) at step")]
    assert line and "ckpt_path=last" in line[0] and str(run) in line[0], err[-2000:]
    step = int(line[0].split("at step ")[1].split(":")[0])
    ck = _load(last)
    assert ck["global_step"] == step and step > 5  # written at the signal's step, not the last periodic save
    assert "ema" in ck and ck["optimizer_states"]
    # and it resumes (in-process)
    base = ["experiment=smoke", *QUIET, "trainer.val_check_interval=100000",
            "callbacks.model_checkpoint.every_n_train_steps=100000"]
    train(compose([*base, f"trainer.max_steps={step + 2}", "ckpt_path=last"], run))
    assert _load(last)["global_step"] == step + 2


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_tree(proc) -> None:
    """A hung DDP run: kill rank 0 and the ranks it started, so no process outlives the test."""
    if proc.poll() is not None:  # exited and reaped: its pid may belong to another process by now
        return
    for pid in [*_children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the DDP child through /proc (Linux)")
@pytest.mark.parametrize("receiver", ["rank0", "rank1"])
def test_sigterm_under_two_process_ddp_stops_every_rank_after_the_same_step(tmp_path, receiver):
    """SIGTERM to rank 0 (``kill <pid>``) or to rank 1 only (a node's scheduler signalling its own processes): the
    ranks agree at the step's end, both leave after that step, rank 0 writes last.ckpt once and the job exits 143.
    With Lightning's own handler (a collective inside the signal handler, a raise on each rank's own flag) the ranks
    part at different steps: the rank1 case hung when run against it, the rank0 case now and then (CI)."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_long_run(run, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", every=5),
                            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(last, proc, timeout=90)
        kids = [k for k in _children(proc.pid) if b"ddstrans" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(kids) == 1, kids  # the rank-1 process the launcher started
        time.sleep(1.0)
        os.kill(proc.pid if receiver == "rank0" else kids[0], signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        _kill_tree(proc)
    assert proc.returncode == 143, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("preempted (SIGTERM) at step")]
    assert len(lines) == 1, err[-2000:]
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert _load(last)["global_step"] == step and step > 5


def test_save_on_sigterm_ignores_other_exceptions(tmp_path):
    cb = SaveLastCheckpoint()

    class T:  # never touched for non-SIGTERM exceptions
        def __getattr__(self, name):
            raise AssertionError(name)

    cb.on_exception(T(), None, RuntimeError("boom"))
    assert cb.saved_path is None


def test_atomic_checkpoint_io_is_the_training_apps_plugin(tmp_path):
    cfg = compose(["experiment=smoke", *QUIET], tmp_path / "run")
    plugins = checkpoint_io_plugins(cfg)["plugins"]
    assert isinstance(plugins[0], AtomicCheckpointIO)
    trainer = L.Trainer(plugins=plugins, accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_crash_during_save_leaves_previous_last_loadable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    replaced = []
    real_replace = os.replace

    def crash_before_rename(src, dst):
        replaced.append((Path(src), Path(dst)))
        raise KeyboardInterrupt("simulated kill during save")

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    (src, dst), = replaced
    assert src.parent == dst.parent == path.parent  # temp file next to the target: rename within one filesystem
    assert _load(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(1000)}, path)
    assert _load(path)["global_step"] == 3


def test_sigkill_during_repeated_saves_never_breaks_the_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"i": -1, "w": torch.zeros(10)}, target)
    code = textwrap.dedent(f"""
        import torch
        from ddstrans.callbacks import atomic_torch_save
        w = torch.randn(2_000_000)
        i = 0
        while True:
            atomic_torch_save({{"i": i, "w": w + i}}, {str(target)!r})
            i += 1
            print(i, flush=True)
    """)
    for delay in (0.5,):
        proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save done
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        ck = _load(target)  # complete: the old file or the new one, never a partial write
        assert ck["i"] >= 0 and ck["w"].numel() == 2_000_000
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]


# ---------------------------------------------------------------------- 2. non-finite values
def _module(teacher, **kw):
    torch.manual_seed(0)
    return DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, **TINY),
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), ema={"decay": 0.9},
                                validation={"num_images": 0}, **kw)


def _trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path))


def _nan_score_on(steps_bad):
    calls = {"n": 0}

    def score(self, z_src, z_tgt, *a, **k):
        bad = calls["n"] in steps_bad if steps_bad is not None else True
        calls["n"] += 1
        g = torch.full_like(z_tgt, float("nan")) if bad else torch.zeros_like(z_tgt) + 0.01
        return g, ScoreInfo(torch.tensor(0), torch.zeros(len(z_tgt)), z_tgt)

    return score


def test_consecutive_nonfinite_steps_stop_the_run_with_a_clear_error(tiny_teacher, tmp_path):
    m = _module(tiny_teacher, loss={"max_consecutive_nonfinite": 3})
    m.score = _nan_score_on(None).__get__(m)
    with pytest.raises(NonFiniteLossError) as e:
        _trainer(tmp_path, 20).fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=64))
    msg = str(e.value)
    assert "3 consecutive steps" in msg and "global step 2" in msg
    assert "learning rate" in msg and "optim.lr" in msg and "teacher" in msg and "bad inputs" in msg
    assert m.skipped_steps == 3


def test_isolated_nonfinite_steps_are_skipped_not_fatal(tiny_teacher, tmp_path):
    m = _module(tiny_teacher, loss={"max_consecutive_nonfinite": 2})
    m.score = _nan_score_on({0, 2, 4}).__get__(m)  # never two in a row
    _trainer(tmp_path, 6).fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=64))
    assert m.skipped_steps == 3 and m.consecutive_skipped == 0
    assert "train/consecutive_skipped" in m.trainer.callback_metrics


def test_fp16_teacher_hint_in_nonfinite_error(tiny_teacher, tmp_path):
    m = _module(tiny_teacher, loss={"max_consecutive_nonfinite": 1})
    m.teacher.to(dtype=torch.float16)
    m.consecutive_skipped = 1
    with pytest.raises(NonFiniteLossError, match="bfloat16 or float32"):
        m._check_nonfinite_streak()


# ---------------------------------------------------------------------- 3. config validation
@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail if the teacher would be loaded: pre-teacher checks must fire first."""
    import ddstrans.cli.train as app

    def boom(*a, **k):
        raise AssertionError("teacher loaded before the config was validated")

    monkeypatch.setattr(app, "build_module", boom)


@pytest.mark.parametrize("overrides, match", [
    (["tasks.tasks=[]"], "no tasks"),
    (["tasks.tasks=[{name: a, source: x, target: y},{name: a, source: x, target: z}]"], "duplicate task name"),
    (["tasks.tasks=[{name: a, source: x}]"], "lacks target"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["optim.lr=0"], "learning rate must be > 0"),
    (["optim.lr=-1e-4"], "learning rate must be > 0"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["+data.global_batch_size=5", "trainer.devices=2"], "not divisible by world size 2"),
    (["teacher=local"], "teacher.path_or_hub_id is required"),
    (["teacher=local", "teacher.path_or_hub_id=/no/such/teacher"], "no such directory"),
    (["loss.max_consecutive_nonfinite=-1"], "max_consecutive_nonfinite"),
])
def test_bad_config_is_one_error_line_before_the_teacher_loads(overrides, match, tmp_path, no_heavy_work, capsys):
    base = [] if "teacher=local" in overrides else ["experiment=smoke"]  # smoke pins the tiny teacher
    cfg = compose([*base, *QUIET, *overrides], tmp_path / "run")
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_teacher_dir_without_components(tmp_path, no_heavy_work):
    (tmp_path / "t" / "unet").mkdir(parents=True)
    cfg = compose(["teacher=local", f"teacher.path_or_hub_id={tmp_path / 't'}"], tmp_path / "run")
    with pytest.raises(ConfigError, match="lacks .*text_encoder"):
        train(cfg)


def test_global_batch_size_sets_per_device_batch(tmp_path):
    cfg = compose(["experiment=smoke", "+data.global_batch_size=8", "trainer.devices=2",
                   "trainer.accumulate_grad_batches=2"], tmp_path / "run")
    validate_config(cfg)
    assert cfg.data.batch_size == 2


def test_resolution_not_divisible_by_teacher_factor_names_a_value(tmp_path):
    cfg = compose(["experiment=smoke", *QUIET, "data.image_size=15"], tmp_path / "run")  # tiny teacher: factor 2
    with pytest.raises(ConfigError, match=r"data.image_size=15 .* factor 2; use 14 or 16"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_missing_resume_checkpoint_is_a_config_error(tmp_path, capsys):
    cfg = compose(["experiment=smoke", *QUIET, "ckpt_path=last"], tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(cfg)
    assert e.value.code == 2 and "hydra.run.dir" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_bad_config_one_line_exit_2_and_debug_trace(tmp_path):
    args = [*_app(), "experiment=smoke", "optim.lr=0", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert err == ["error: optim.lr=0: the learning rate must be > 0"], out.stderr[-2000:]
    dbg = subprocess.run(args, cwd=tmp_path, env=_env(DDSTRANS_DEBUG="1"), capture_output=True, text=True, timeout=120)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr and "ConfigError" in dbg.stderr


# ---------------------------------------------------------------------- 4. bad input files
@pytest.fixture(scope="module")
def translator_dir(tiny_teacher_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel_export")
    teacher = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp / "cache")
    m = _module(teacher)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=8))
    trainer.save_checkpoint(tmp / "last.ckpt")
    return tmp / "last.ckpt", export_checkpoint(tmp / "last.ckpt", tmp / "translator")


def _inputs(d: Path) -> dict[str, Path]:
    d.mkdir()
    rng = np.random.default_rng(0)
    good = []
    for i in range(2):
        p = d / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        good.append(p)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    trunc = d / "truncated.png"
    trunc.write_bytes(good[0].read_bytes()[:60])
    return {"good": good, "bad": [d / "corrupt.png", d / "empty.jpg", d / "notes.txt", trunc, d / "missing.png"]}


def test_translate_reports_each_bad_file_processes_the_rest_exit_1(translator_dir, tmp_path, capsys):
    _, tr = translator_dir
    files = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    rc = cli(["translate", str(tr), "--task", "cat2dog", *map(str, files["good"] + files["bad"]), "-o", str(out),
              "--batch-size", "3", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["good0.png", "good1.png"]
    for b in files["bad"]:
        assert b.name in cap.err, b
    assert "5 input(s) failed" in cap.out
    before = (out / "good0.png").read_bytes()
    assert cli(["translate", str(tr), "--task", "cat2dog", str(files["good"][0]), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "good0.png").read_bytes() == before
    assert cli(["translate", str(tr), "--task", "nope", str(files["good"][0]), "-o", str(tmp_path / "o2")]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_edit_bad_image_is_a_clean_error_and_never_overwrites(tiny_teacher_dir, tmp_path, capsys):
    files = _inputs(tmp_path / "in")
    for bad in files["bad"]:
        rc = cli(["edit", str(bad), "--teacher", str(tiny_teacher_dir), "--source", "a cat", "--target", "a dog",
                  "-o", str(tmp_path / "o.png"), "--steps", "1", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("error: ") and bad.name in err and "Traceback" not in err
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    rc = cli(["edit", str(files["good"][0]), "--teacher", str(tiny_teacher_dir), "--source", "a", "--target", "b",
              "-o", str(existing), "--steps", "1", "--device", "cpu"])
    assert rc == 1 and existing.read_bytes() == b"keep" and "--overwrite" in capsys.readouterr().err


def test_make_shards_reports_and_skips_bad_files(tmp_path, caplog):
    files = _inputs(tmp_path / "in")
    files["bad"][-1].write_bytes(b"")  # make the 'missing' one exist (empty) inside the folder
    rc = cli(["make-shards", "from-folder", str(tmp_path / "in"), str(tmp_path / "shards"), "--min-size", "8",
              "--no-progress"])
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["count"] == 2 and sum(m["skipped"].values()) == 4  # notes.txt is read as a (dangling) caption file
    logged = caplog.text
    for b in ("corrupt.png", "empty.jpg", "missing.png", "truncated.png"):
        assert b in logged
    # unreadable inputs: the readable ones are written, and the exit status says that some failed
    assert rc == 1
    assert cli(["make-shards", "from-folder", str(tmp_path / "in"), str(tmp_path / "shards"), "--no-progress"]) == 1


# ---------------------------------------------------------------------- 5. safe loading
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_export_refuses_to_unpickle_a_planted_checkpoint(translator_dir, tmp_path, capsys):
    ckpt, _ = translator_dir
    marker = tmp_path / "pwned"
    ck = torch.load(ckpt, weights_only=True)
    ck["ddstrans"]["evil"] = _Evil(marker)
    planted = tmp_path / "planted.ckpt"
    torch.save(ck, planted)
    with pytest.raises(ExportError, match="trust_checkpoint=True"):
        load_training_checkpoint(planted)
    assert cli(["export", str(planted), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "--trust-checkpoint" in err
    assert not marker.exists()
    assert load_training_checkpoint(ckpt)["global_step"] == 2  # a genuine checkpoint loads weights-only


def test_export_refuses_a_truncated_checkpoint(translator_dir, tmp_path):
    ckpt, _ = translator_dir
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        export_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_refuses_to_unpickle_a_planted_last_ckpt(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["experiment=smoke", *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose(base, run))
    last = run / "checkpoints" / "last.ckpt"
    ck = _load(last)
    marker = tmp_path / "pwned"
    ck["evil"] = _Evil(marker)
    torch.save(ck, last)
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(compose([*base, "trainer.max_steps=4", "ckpt_path=last"], run))
    assert e.value.code == 2 and "weights_only" in capsys.readouterr().err
    assert not marker.exists()


def test_translator_refuses_truncated_tampered_unlisted_and_pickle_files(translator_dir, tmp_path):
    _, good = translator_dir
    weights = "generator/diffusion_pytorch_model.safetensors"

    def copy(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = copy("truncated")
    w = d / weights
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(TranslatorLoadError, match="truncated"):
        Translator.from_pretrained(d)

    d = copy("tasks_tampered")
    t = d / "tasks.safetensors"
    data = bytearray(t.read_bytes())
    data[len(data) // 2] ^= 0x01
    t.write_bytes(bytes(data))
    with pytest.raises(TranslatorLoadError, match="tasks.safetensors does not match its sha256"):
        Translator.from_pretrained(d)

    d = copy("no_hashes")
    info = json.loads((d / "translator.json").read_text())
    info["files"] = {}
    (d / "translator.json").write_text(json.dumps(info))
    with pytest.raises(TranslatorLoadError, match="no file hashes"):
        Translator.from_pretrained(d)

    d = copy("pickle_planted")
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(marker)}, d / "generator" / "diffusion_pytorch_model.bin")
    with pytest.raises(TranslatorLoadError, match="unexpected file"):
        Translator.from_pretrained(d)
    # even unverified, only safetensors are read: a pickle-only generator is refused without unpickling it
    (d / weights).unlink()
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own "no safetensors" error
        Translator.from_pretrained(d, verify=False)
    assert not marker.exists()
    Translator.from_pretrained(good)  # the untouched export still loads
