"""Shapes-world metrics at validation (ddstrans.shapes.callback.ShapesMetrics), as experiment=shapes logs them."""

from __future__ import annotations

import csv

import pytest

from ddstrans.cli.train import compose, train
from ddstrans.shapes.callback import ShapesMetrics

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
TASKS = ["to_blue", "to_red", "to_yellow", "to_square", "to_checkered"]


def _last_val_row(run):
    rows = []
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        rows += list(csv.DictReader(open(f)))
    rows = [r for r in rows if r.get("val/target_acc")]
    assert rows, "no validation row with val/target_acc"
    return rows[-1]


def test_rejects_too_few_inputs():
    with pytest.raises(ValueError, match="n >= 2"):
        ShapesMetrics(n=1)


@pytest.mark.slow
def test_shapes_experiment_logs_ground_truth_metrics_per_task(tmp_path):
    # lr ~ 0: the zero-initialised generator stays the identity, whose figures are known exactly:
    # nothing reaches its target, colour and background tasks keep the mask (IoU 1) and the spread (diversity 1).
    run = tmp_path / "run"
    train(compose(["experiment=shapes", "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.lr=1e-12",
                   "data.batch_size=2", "callbacks.shapes_metrics.n=6", "export_after_fit=false", *QUIET], run))
    row = _last_val_row(run)
    for task in TASKS:
        for key in ("target_acc", "mask_iou", "keep_psnr", "diversity"):
            assert f"val/{task}/{key}" in row, sorted(row)
    for task in ("to_blue", "to_red", "to_yellow", "to_checkered"):
        assert float(row[f"val/{task}/target_acc"]) == 0.0
        assert float(row[f"val/{task}/mask_iou"]) > 0.99
        assert abs(float(row[f"val/{task}/diversity"]) - 1.0) < 0.01
    assert float(row["val/to_square/mask_iou"]) < 0.95  # the target mask is the square's, not the input's
    assert float(row["val/target_acc"]) == pytest.approx(
        sum(float(row[f"val/{t}/target_acc"]) for t in TASKS) / len(TASKS))
