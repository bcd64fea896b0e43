"""Real-image metrics at validation (callbacks=real_metrics): logged per task and averaged, best checkpoint by one."""

from __future__ import annotations

import csv

import pytest

from ddstrans.cli.train import compose, train
from ddstrans.testing import make_tiny_clip, make_tiny_dino
from ddstrans.validation import ConfigError, validate_config
from ddstrans.validation_metrics import ImageMetrics

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("val_metric_models")
    return make_tiny_clip(d / "clip"), make_tiny_dino(d / "dino")


def test_smoke_run_logs_metrics_and_keeps_the_best_checkpoint(metric_models, tmp_path):
    clip, dino = metric_models
    run = tmp_path / "run"
    train(compose(["experiment=smoke", "callbacks=real_metrics", f"callbacks.image_metrics.clip={clip}",
                   f"callbacks.image_metrics.dino={dino}", "callbacks.image_metrics.n=3", "trainer.max_steps=6",
                   "trainer.val_check_interval=2", "data.num_val=3", *QUIET], run))
    rows = [r for f in sorted(run.glob("csv/version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    val = [r for r in rows if r.get("val/clip_direction")]
    assert len(val) == 3  # steps 2, 4, 6
    for r in val:
        for task in ("cat2lion", "cat2dog"):
            for key in ("clip_target", "clip_direction", "dino_structure"):
                assert r[f"val/{task}/{key}"] != "", (task, key)
        assert float(r["val/dino_structure"]) == pytest.approx(
            (float(r["val/cat2lion/dino_structure"]) + float(r["val/cat2dog/dino_structure"])) / 2)
    best = max(range(3), key=lambda i: float(val[i]["val/clip_direction"]))  # validations after steps 2, 4, 6
    saved = sorted(p.name for p in (run / "checkpoints").glob("best_step_*.ckpt"))
    assert saved == [f"best_step_{2 * (best + 1):07d}.ckpt"]


def test_config_without_metric_model_is_one_line(tmp_path, metric_models):
    with pytest.raises(ConfigError, match="callbacks.image_metrics.clip="):
        validate_config(compose(["experiment=smoke", "callbacks=real_metrics"], tmp_path))
    _, dino = metric_models
    with pytest.raises(ConfigError, match="monitor=val/clip_direction needs callbacks.image_metrics.clip"):
        validate_config(compose(["experiment=smoke", "callbacks=real_metrics", f"callbacks.image_metrics.dino={dino}"],
                                tmp_path))
    validate_config(compose(["experiment=smoke", "callbacks=real_metrics", f"callbacks.image_metrics.dino={dino}",
                             "callbacks.best_checkpoint.monitor=val/dino_structure", "callbacks.best_checkpoint.mode=min"],
                            tmp_path))
    with pytest.raises(ValueError, match="no metric to compute"):
        ImageMetrics()
