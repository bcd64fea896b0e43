"""wandb: offline fallback without credentials (one message), and an offline run writes scalars and an image."""

from __future__ import annotations

import re
import time

import pytest
from omegaconf import OmegaConf

from ddstrans.cli.train import compose, train
from ddstrans.runtime import configure_wandb, wandb_has_credentials

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]


def test_offline_fallback_without_credentials(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not wandb_has_credentials()
    cfg = OmegaConf.create({"offline": False, "save_dir": str(tmp_path)})
    configure_wandb(cfg)
    assert cfg.offline is True
    err = capsys.readouterr().err
    assert err.count("wandb:") == 1 and "OFFLINE" in err and "wandb sync" in err
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = OmegaConf.create({"offline": False, "save_dir": str(tmp_path)})
    configure_wandb(cfg)
    assert cfg.offline is False  # credentials: online
    monkeypatch.setenv("WANDB_MODE", "offline")
    configure_wandb(cfg)
    assert cfg.offline is True and capsys.readouterr().err == ""


@pytest.mark.slow
def test_wandb_offline_run_writes_scalars_and_image(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    run = tmp_path / "run"
    train(compose(["experiment=smoke", "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2", *QUIET],
                  run))
    runs = list(run.rglob("offline-run-*"))
    assert len(runs) == 1, list(run.rglob("*"))
    files = runs[0] / "files"
    assert list(runs[0].glob("run-*.wandb"))
    images = list(files.rglob("media/images/val/grid_*.png"))
    assert images, sorted(p.as_posix() for p in files.rglob("*"))
    # the run log (protobuf records) holds history items: key, then value_json (field 16: 0x82 0x01, length).
    # wandb's service may still be flushing right after finish(): poll briefly.
    keys = ("train/loss_dds", "train/grad_norm", "train/guidance", "val/dds_norm")
    pattern = {k: re.escape(k.encode()) + rb"\x82\x01(.)" for k in keys}
    for _ in range(40):
        data = next(runs[0].glob("run-*.wandb")).read_bytes()
        if all(re.search(p, data, re.S) for p in pattern.values()):
            break
        time.sleep(0.5)
    for key in keys:
        m = re.search(pattern[key], data, re.S)
        assert m, (key, len(data))
        value = data[m.end():m.end() + m.group(1)[0]]
        assert float(value) == float(value), (key, value)  # a finite number was logged
    assert b"images/separated" in data and b"val/grid" in data
