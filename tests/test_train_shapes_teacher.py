"""ddstrans.shapes.train_teacher: an interrupted run resumes without repeating its logs' steps."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

# a teacher small enough to train a few steps in seconds, probed every 2 steps (1 sample per caption)
TINY = ["--channels", "8,16", "--attn-from", "1", "--head-dim", "8", "--text-dim", "16", "--text-layers", "1",
        "--batch-size", "2", "--probe-every", "2", "--probe-n", "1"]


@pytest.fixture(scope="module")
def trainer():
    from ddstrans.shapes import train_teacher

    return train_teacher


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _steps(path: Path, header: bool) -> list[int]:
    rows = _rows(path)
    return [int(r[0]) for r in (rows[1:] if header else rows)]


def test_drop_rows_after_keeps_the_header_and_steps_up_to_the_saved_one(trainer, tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n")
    trainer.drop_rows_after(log, 2, header=True)
    assert log.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]
    probes = tmp_path / "probe_log.csv"
    probes.write_text("250,0.9271,1\n500,0.8750,0\n750,0.9479,1\n")
    trainer.drop_rows_after(probes, 700, header=False)
    assert probes.read_text().splitlines() == ["250,0.9271,1", "500,0.8750,0"]
    trainer.drop_rows_after(tmp_path / "missing.csv", 1, header=True)  # nothing to trim: no error, no file
    assert not (tmp_path / "missing.csv").exists()


@pytest.mark.slow
def test_a_resumed_run_writes_each_step_once(trainer, tmp_path):
    tiny = ["--out", str(tmp_path), *TINY, "--log-every", "1"]
    trainer.main([*tiny, "--steps", "4"])
    # rows a crash would leave behind: written after the last save (step 4), so the resumed run writes them again
    with open(tmp_path / "train_log.csv", "a") as f:
        f.write("5,0.1,0.001,1.0\n6,0.1,0.001,1.0\n")
    with open(tmp_path / "probe_log.csv", "a") as f:
        f.write("6,9.9999,1\n")  # an impossible score: a fraction of samples is <= 1
    trainer.main([*tiny, "--steps", "6"])
    assert _steps(tmp_path / "train_log.csv", header=True) == [1, 2, 3, 4, 5, 6]
    assert _steps(tmp_path / "probe_log.csv", header=False) == [2, 4, 6]
    assert "9.9999" not in (tmp_path / "probe_log.csv").read_text()  # the stale probe row is gone
    best = max((float(r[1]), -int(r[0])) for r in csv.reader(open(tmp_path / "probe_log.csv")))
    assert f"EMA at step {-best[1]}," in (tmp_path / "README.md").read_text()  # the card names the exported step


@pytest.mark.slow
def test_the_card_names_the_exported_probe_step_before_any_save(trainer, tmp_path, monkeypatch):
    def crash(*args, **kwargs):  # the process dies at its first state save, after the probe exported
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "atomic_torch_save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(["--out", str(tmp_path), *TINY, "--steps", "2"])
    assert (tmp_path / "unet").is_dir()  # exported by the probe
    assert "EMA at step 2," in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_stop_at_ends_early_on_the_full_runs_schedule(trainer, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer.main(["--out", str(full), *TINY, "--log-every", "1", "--steps", "6", "--warmup", "1"])
    trainer.main(["--out", str(cut), *TINY, "--log-every", "1", "--steps", "6", "--warmup", "1", "--stop-at", "4"])
    rows = {p: _rows(p / "train_log.csv")[1:] for p in (full, cut)}
    assert [int(r[0]) for r in rows[cut]] == [1, 2, 3, 4]
    assert [r[2] for r in rows[cut]] == [r[2] for r in rows[full][:4]]  # the lr of a 6-step schedule, not a 4-step one
    assert [r[1] for r in rows[cut]] == [r[1] for r in rows[full][:4]]  # seeded: the same batches and losses


@pytest.mark.slow
def test_the_probe_samples_with_the_given_sampler_and_the_card_says_so(trainer, tmp_path, monkeypatch):
    from diffusers import DDIMScheduler

    seen = []
    real = DDIMScheduler.set_timesteps

    def spy(self, n, *args, **kwargs):
        seen.append(n)
        return real(self, n, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "set_timesteps", spy)
    trainer.main(["--out", str(tmp_path), *TINY, "--steps", "2", "--probe-steps", "3", "--probe-guidance", "2"])
    assert seen == [3]  # one probe (step 2), three DDIM steps
    assert "1 DDIM-3 samples per caption, guidance 2:" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_keep_last_exports_the_last_steps_ema_and_still_logs_the_probes(trainer, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    trainer.main(["--out", str(tmp_path), *TINY, "--steps", "4", "--keep", "last"])
    assert _steps(tmp_path / "probe_log.csv", header=False) == [2, 4]
    assert all(r[2] == "0" for r in _rows(tmp_path / "probe_log.csv"))  # logged, none exported as a best snapshot
    state = torch.load(tmp_path / "_train_state" / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    n = len(list(unet.parameters()))
    for p, e in zip(unet.parameters(), state["ema"][:n]):  # the unet's parameters come first in the EMA list
        assert torch.equal(p.detach(), e)
    assert "EMA at step" not in (tmp_path / "README.md").read_text()


def test_v_prediction_trains_on_the_schedulers_velocity_and_resumes_only_as_v(trainer, tmp_path):
    import argparse

    import torch
    from diffusers import DDPMScheduler

    from ddstrans import Teacher

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    abar = sched.alphas_cumprod
    args = argparse.Namespace(seed=0, batch_size=4, cond_drop=0.0, t_high_frac=0.0, t_low_frac=0.0)
    xt_e, t_e, eps, _ = trainer.make_batch(3, argparse.Namespace(**vars(args), prediction_type="epsilon"), abar)
    xt_v, t_v, v, _ = trainer.make_batch(3, argparse.Namespace(**vars(args), prediction_type="v_prediction"), abar)
    assert torch.equal(xt_e, xt_v) and torch.equal(t_e, t_v)  # same batch, another target
    a = abar[t_e].view(-1, 1, 1, 1)
    x0 = (xt_e - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t_e), atol=1e-4, rtol=1e-4)

    trainer.main(["--out", str(tmp_path), *TINY, "--steps", "2", "--prediction-type", "v_prediction"])
    teacher = Teacher.from_pretrained(str(tmp_path))
    assert teacher.prediction_type == "v_prediction"
    assert "v prediction, 1000 steps" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit, match="v_prediction"):
        trainer.main(["--out", str(tmp_path), *TINY, "--steps", "4"])  # an epsilon run may not resume it
