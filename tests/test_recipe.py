"""scripts/recipe.py end to end with a tiny teacher: generate, train on the shards only, export, score on renders."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_trains_on_teacher_samples_and_scores_on_renders(tiny_pixel_teacher_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pixel_teacher_dir, teacher)
    (teacher / "ddstrans_settings.json").write_text(json.dumps({"sampling": {"num_inference_steps": 2}}))
    out = tmp_path / "recipe"
    text = _recipe().main(["--out", str(out), "--teacher", str(teacher), "--n", "2", "--captions", "3",
                           "--steps", "2", "--eval-n", "2", "--override", "generator=tiny",
                           "--override", "trainer.enable_progress_bar=false", "--override", "data.val_samples=2",
                           "--override", "logger=csv"])
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["generation"]["num_inference_steps"] == 2  # the teacher's setting
    cfg = yaml.safe_load((out / "recipe-run" / "config_resolved.yaml").read_text())
    assert cfg["data"]["_target_"].endswith("ShardDataModule") and cfg["data"]["urls"] == str((out / "shards").resolve())
    rows = json.loads((out / "eval-recipe.json").read_text())
    assert sorted(r["task"] for r in rows) == sorted(["to_blue", "to_red", "to_yellow", "to_square", "to_checkered"])
    assert all(r["method"] == "network" and r["n"] == 2 for r in rows)
    assert (out / "table.md").read_text().strip() == text.strip()
    assert "| recipe (teacher samples) | to_square |" in text and "6 samples, no caption check" in text
