"""The configs and the shapes teacher ship with the package (``ddstrans.assets``); users add config dirs with
Hydra's ``hydra.searchpath``; a built wheel holds every shipped file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ddstrans import assets
from ddstrans.cli.train import CONFIG_PATH, compose

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_assets_resolve_to_the_shipped_directories():
    assert Path(CONFIG_PATH) == assets.configs_dir()
    assert (assets.configs_dir() / "train.yaml").is_file()
    assert (assets.configs_dir() / "experiment" / "smoke.yaml").is_file()
    teacher = assets.shapes_teacher_dir()
    assert (teacher / "model_index.json").is_file() and (teacher / "unet" / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        assets.asset_path("nope")


def test_packaged_copy_wins_over_the_checkout(tmp_path, monkeypatch):
    packaged = tmp_path / "_assets"
    (packaged / "configs").mkdir(parents=True)
    monkeypatch.setattr(assets, "PACKAGED_DIR", packaged)
    assert assets.configs_dir() == packaged / "configs"
    # the teacher is not in this fake package: the checkout's is found
    assert assets.shapes_teacher_dir() == (ROOT / "checkpoints" / "shapes-teacher").resolve()


def test_missing_asset_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "PACKAGED_DIR", tmp_path / "_assets")
    monkeypatch.setattr(assets, "CHECKOUT_PATHS", {"configs": "no/such/dir"})
    with pytest.raises(FileNotFoundError, match="asset 'configs' not found"):
        assets.configs_dir()


def test_user_config_dir_via_hydra_searchpath(tmp_path):
    """An experiment config in the user's own directory is found with ``hydra.searchpath`` and composes on top of
    the shipped groups (here: the smoke experiment with a different learning rate and step count)."""
    user = tmp_path / "my_configs"
    (user / "experiment").mkdir(parents=True)
    (user / "experiment" / "my_smoke.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - smoke\n"
        "task_name: my_smoke\n"
        "optim:\n"
        "  lr: 0.00042\n"
        "trainer:\n"
        "  max_steps: 7\n")
    smoke = compose(["experiment=smoke"], tmp_path / "a")
    cfg = compose([f"hydra.searchpath=[file://{user}]", "experiment=my_smoke"], tmp_path / "b")
    assert cfg.task_name == "my_smoke" and cfg.optim.lr == 0.00042 and cfg.trainer.max_steps == 7
    assert cfg.teacher == smoke.teacher and cfg.tasks == smoke.tasks  # the rest is the shipped smoke experiment
    with pytest.raises(Exception, match="my_smoke"):
        compose(["experiment=my_smoke"], tmp_path / "c")  # not found without the search path


@pytest.mark.slow
def test_wheel_holds_configs_and_teacher(tmp_path):
    """``pip wheel`` of the repository: every config and every file of the shapes teacher is inside, under
    ``ddstrans/_assets/`` where ``ddstrans.assets`` looks for them (about 10 s)."""
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("ddstrans-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset, source in assets.CHECKOUT_PATHS.items():
        expected = {f"ddstrans/_assets/{asset}/{f}" for f in _files(ROOT / source) if "_train_state" not in f}
        assert expected and expected <= names, sorted(expected - names)[:5]
    assert "ddstrans/assets.py" in names and "ddstrans/cli/train.py" in names
    assert not any(n.startswith(("configs/", "checkpoints/")) for n in names)  # nothing at the top level


def test_make_shards_from_teacher_defaults_to_the_shipped_teacher(tmp_path):
    import json

    from ddstrans.cli.main import main

    out = tmp_path / "shards"
    assert main(["make-shards", "from-teacher", str(out), "--prompt", "a red circle on a striped background",
                 "--count", "1", "--steps", "2", "--guidance", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["teacher"]).resolve() == assets.shapes_teacher_dir().resolve()
    assert manifest["count"] == 1
