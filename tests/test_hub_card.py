"""Model card of an export (front matter, examples, eval section) and the hub round trip, offline: ``HfApi`` and
``snapshot_download`` replaced by a local folder acting as the hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ddstrans import hub
from ddstrans.cli.main import main as cli
from ddstrans.translator import Translator, TranslatorLoadError


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---", 4)])


def test_card_front_matter_examples_and_training(shapes_translator_dir):
    card = (shapes_translator_dir / "README.md").read_text()
    front = _front(card)
    assert front["library_name"] == "ddstrans" and front["base_model"] == "checkpoints/shapes-teacher"
    assert front["license"] == "other" and "ddstrans" in front["tags"] and front["pipeline_tag"] == "image-to-image"
    assert "![before and after](examples/before_after.png)" in card
    for name in ("to_blue", "to_checkered", "## Training", "## Evaluation", "Not evaluated yet"):
        assert name in card
    assert "| data | `ddstrans.shapes.data.ShapesDataModule` |" in card
    info = json.loads((shapes_translator_dir / "translator.json").read_text())
    ex = [f for f in info["files"] if f.startswith("examples/")]
    assert ex == ["examples/before_after.png", *(f"examples/example_{i}.png" for i in range(4))]
    from PIL import Image

    grid = Image.open(shapes_translator_dir / "examples" / "before_after.png")
    assert grid.width > grid.height  # rows: input then one column per task


def test_card_eval_update_keeps_integrity(shapes_translator_dir, tmp_path):
    d = tmp_path / "tr"
    shutil.copytree(shapes_translator_dir, d)
    rows = [{"task": "to_blue", "method": "network", "n": 8, "target_acc": 0.875, "mask_iou": 0.9512}]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    assert cli(["card", str(d), "--eval", str(tmp_path / "eval.json")]) == 0
    card = (d / "README.md").read_text()
    assert "| to_blue | network | 8 | 0.875 | 0.9512 |" in card and "Not evaluated yet" not in card
    Translator.from_pretrained(d)  # the new card's hash is in translator.json
    # a tampered directory is not re-signed
    (d / "tasks.safetensors").write_bytes(b"x")
    assert cli(["card", str(d), "--eval", str(tmp_path / "eval.json")]) == 1
    (tmp_path / "bad.json").write_text("{")
    assert cli(["card", str(shapes_translator_dir), "--eval", str(tmp_path / "bad.json")]) == 1


def test_base_model_only_for_hub_ids(shapes_translator_dir):
    from ddstrans.model_card import render_card

    info = json.loads((shapes_translator_dir / "translator.json").read_text())
    info["teacher"]["source"] = "/data/models/sd15"
    card = render_card(info)
    assert "base_model" not in _front(card) and "`/data/models/sd15`" in card
    info["teacher"]["source"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert _front(render_card(info, license="creativeml-openrail-m"))["base_model"] == info["teacher"]["source"]


def test_license_from_option_or_teacher_card(tmp_path):
    from ddstrans.model_card import teacher_license

    t = tmp_path / "teacher"
    t.mkdir()
    assert teacher_license(t) is None
    (t / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a teacher\n")
    assert teacher_license(t) == "creativeml-openrail-m"


class _LocalHub:
    """``HfApi`` and ``snapshot_download`` over a folder: repos are ``<root>/<org>/<name>``."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=False, exist_ok=True, repo_type="model"):
        self.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, folder_path, repo_id, repo_type, revision, commit_message, allow_patterns):
        import fnmatch
        from pathlib import Path

        self.calls.append(("upload_folder", repo_id))
        src = Path(folder_path)
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (self.root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, self.root / repo_id / rel)
        return type("CommitInfo", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()

    def snapshot_download(self, repo_id, revision=None, local_dir=None, token=None, repo_type="model"):
        shutil.copytree(self.root / repo_id, local_dir, dirs_exist_ok=True)
        meta = Path(local_dir) / ".cache" / "huggingface"  # as huggingface_hub keeps its local_dir metadata
        for f in (self.root / repo_id).rglob("*"):
            if f.is_file():
                m = meta / "download" / f"{f.relative_to(self.root / repo_id).as_posix()}.metadata"
                m.parent.mkdir(parents=True, exist_ok=True)
                m.write_text("0\n0\n0\n")
        (meta / ".gitignore").write_text("*")
        return str(local_dir)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    import huggingface_hub

    h = _LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: h)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", h.snapshot_download)
    monkeypatch.setenv("DDSTRANS_HOME", str(tmp_path / "home"))
    return h


def test_push_and_load_by_repo_id(shapes_translator_dir, local_hub, tmp_path):
    tr = Translator.from_pretrained(shapes_translator_dir)
    (shapes_translator_dir / "scratch.txt").write_text("not part of the translator")
    try:
        url = tr.push_to_hub("org/shapes-translator", private=True)
    finally:
        (shapes_translator_dir / "scratch.txt").unlink()
    assert url.endswith("/commit/1") and local_hub.calls[0] == ("create_repo", "org/shapes-translator", True)
    repo = local_hub.root / "org" / "shapes-translator"
    assert (repo / "translator.json").is_file() and not (repo / "scratch.txt").exists()  # only listed files
    got = Translator.from_pretrained("org/shapes-translator")
    assert got.path == tmp_path / "home" / "translators" / "org--shapes-translator"
    from PIL import Image

    im = Image.open(shapes_translator_dir / "examples" / "example_0.png")
    assert got(im, task="to_red").tobytes() == tr(im, task="to_red").tobytes()
    assert Translator.from_pretrained("org/shapes-translator", backend="onnx").backend == "onnx"


def test_hub_download_is_verified(shapes_translator_dir, local_hub):
    repo = local_hub.root / "org" / "evil"
    shutil.copytree(shapes_translator_dir, repo)
    w = repo / "generator" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(TranslatorLoadError, match="sha256"):
        Translator.from_pretrained("org/evil")


def test_push_refuses_a_tampered_directory(shapes_translator_dir, local_hub, tmp_path):
    d = tmp_path / "tr"
    shutil.copytree(shapes_translator_dir, d)
    tr = Translator.from_pretrained(d)
    (d / "tasks.safetensors").write_bytes(b"oops")  # changed after loading
    with pytest.raises(TranslatorLoadError, match="tasks.safetensors"):
        tr.push_to_hub("org/x")
    assert local_hub.calls == []


def test_repo_id_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_repo_id("org/name") and not hub.is_repo_id("name") and not hub.is_repo_id("../x/y")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_repo_id("org/name")  # an existing local path wins


def test_card_update_is_one_swap_under_the_export_lock(shapes_translator_dir, tmp_path):
    from ddstrans.locks import LockFile

    d = tmp_path / "tr"
    shutil.copytree(shapes_translator_dir, d)
    (tmp_path / "eval.json").write_text(json.dumps([{"task": "to_red", "method": "network", "n": 4}]))
    before = json.loads((d / "translator.json").read_text())["files"]
    with LockFile(tmp_path / ".tr.lock", what="export target"):  # an export of the same directory is running
        assert cli(["card", str(d), "--eval", str(tmp_path / "eval.json")]) == 1
    assert json.loads((d / "translator.json").read_text())["files"] == before
    assert cli(["card", str(d), "--eval", str(tmp_path / "eval.json")]) == 0
    after = json.loads((d / "translator.json").read_text())["files"]
    assert set(after) == set(before) and after["README.md"] != before["README.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "tr"]  # no temp or old folder left
    Translator.from_pretrained(d)


def test_hub_metadata_folder_is_skipped_only_in_downloads(shapes_translator_dir, local_hub, tmp_path):
    Translator.from_pretrained(shapes_translator_dir).push_to_hub("org/t")
    got = Translator.from_pretrained("org/t")
    assert (got.path / ".cache" / "huggingface" / ".gitignore").is_file()  # huggingface_hub's local_dir metadata
    (got.path / ".cache" / "weights.safetensors").write_bytes(b"x")  # anything else stays refused
    with pytest.raises(TranslatorLoadError, match="unexpected file .cache/weights.safetensors"):
        Translator.from_pretrained("org/t")
    d = tmp_path / "local"
    shutil.copytree(shapes_translator_dir, d)
    (d / ".cache" / "huggingface").mkdir(parents=True)
    (d / ".cache" / "huggingface" / "x.json").write_text("{}")
    with pytest.raises(TranslatorLoadError, match="unexpected file"):
        Translator.from_pretrained(d)


def test_training_summary_names_the_second_timestep_band_only_when_set():
    from ddstrans.model_card import training_summary

    plain = dict(training_summary({"loss": {"t_range_mix": None, "t_range_mix_prob": 0.0, "t_range_mix_from_step": 0,
                                            "guidance": 3.0}}))
    assert plain == {"guidance": 3.0}
    mixed = dict(training_summary({"loss": {"t_range_mix": [1, 20], "t_range_mix_prob": 0.5,
                                            "t_range_mix_from_step": 4400}}))
    assert mixed == {"second timestep band": [1, 20], "share of samples in the second band": 0.5,
                     "second band from step": 4400}


def test_training_summary_names_the_identity_weight_phases():
    from ddstrans.model_card import training_summary

    summary = dict(training_summary({"loss": {"identity_weight": 0.1, "identity_weight_phases": [[4125, 0.3]]}}))
    assert summary == {"identity weight": 0.1, "identity weight from a step": [[4125, 0.3]]}
    assert "identity weight from a step" not in dict(training_summary({"loss": {"identity_weight": 0.1,
                                                                                 "identity_weight_phases": None}}))


def test_training_summary_names_the_anchor_term_only_when_it_runs():
    from ddstrans.model_card import training_summary

    on = dict(training_summary({"loss": {"anchor_weight_phases": [[3625, 0.3]], "anchor_tasks": ["to_square"]}}))
    assert on == {"anchor weight from a step": [[3625, 0.3]], "anchor tasks": ["to_square"]}
    assert dict(training_summary({"loss": {"anchor_weight_phases": None, "anchor_tasks": ["to_square"]}})) == {}
