"""``ddstrans eval --images``: real-image evaluation of a tiny translator with tiny metric models, end to end."""

from __future__ import annotations

import functools
import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddstrans.cli.main import main
from ddstrans.testing import make_tiny_clip, make_tiny_dino, make_tiny_inception

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


@pytest.fixture(scope="module")
def world(tiny_teacher_dir, tmp_path_factory):
    from ddstrans.data.procedural import ProceduralDataModule
    from ddstrans.export import export_checkpoint
    from ddstrans.generator import build_generator
    from ddstrans.module import DDSTranslationModule
    from ddstrans.teacher import Teacher

    root = tmp_path_factory.mktemp("eval_images")
    teacher = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=root / "cache")
    torch.manual_seed(0)
    m = DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, **TINY),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5},
                             validation={"num_images": 0})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=4))
    trainer.save_checkpoint(root / "a.ckpt")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    return {"root": root, "teacher": tiny_teacher_dir, "translator": export_checkpoint(root / "a.ckpt", root / "translator"),
            "ckpt": root / "a.ckpt", "images": images, "clip": make_tiny_clip(root / "clip"),
            "dino": make_tiny_dino(root / "dino"), "inception": make_tiny_inception(root / "inc.pt")}


def _raw_directional(clip_dir, x, y, src, tgt):
    """Directional CLIP from transformers' CLIPModel itself: pixels normalised by hand with the CLIP mean/std."""
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pooled = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output  # noqa: E731

    def img(v):
        return F.normalize(pooled(model.get_image_features(pixel_values=(((v + 1) / 2).clamp(0, 1) - mean) / std)), dim=-1)

    def txt(p):
        t = tok(p, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        return F.normalize(pooled(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])), dim=-1)

    with torch.no_grad():
        return F.cosine_similarity(img(y) - img(x), txt(tgt) - txt(src), dim=-1)


def test_acceptance_table_json_grid_plot_and_directional_clip(world, tmp_path, capsys):
    from ddstrans.eval_inputs import load_folder
    from ddstrans.translator import Translator

    w = world
    out = tmp_path / "out"
    rc = main(["eval", str(w["translator"]), "--images", str(w["images"]), "--clip", str(w["clip"]), "--dino",
               str(w["dino"]), "--methods", "network,identity,dds", "--edit-steps", "3", "--resolution", "32",
               "--json", str(out / "eval.json"), "--table", str(out / "eval.md"), "--grid", str(out / "grid.png"), "--plot", str(out / "plot.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| cat2lion | network | 5 |" in captured.out and "| cat2dog | dds | 5 |" in captured.out
    assert "broken.png" in captured.err
    assert (out / "grid.png").is_file() and (out / "plot.png").is_file()
    assert "| cat2dog | dds | 5 |" in (out / "eval.md").read_text()
    report = json.loads((out / "eval.json").read_text())
    assert report["edit"]["steps"] == 3 and report["edit"]["lr"] == 0.1  # the rest: EditConfig's defaults
    assert [s["file"].endswith("broken.png") for s in report["skipped"]] == [True]
    rows = {(r["task"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(t, m) for t in ("cat2lion", "cat2dog") for m in ("network", "identity", "dds")}
    ident = rows[("cat2lion", "identity")]["metrics"]
    assert ident["clip_direction"]["mean"] is None and ident["clip_direction"]["undefined"] == 5
    assert ident["dino_structure"]["mean"] == 0.0
    # the network's directional CLIP, recomputed independently from the translator and the raw CLIP model
    x = load_folder(w["images"], 32).floats()
    tr = Translator.from_pretrained(w["translator"])
    for task in TASKS:
        y = tr.translate_tensor(x, task["name"])
        want = _raw_directional(w["clip"], x, y, [task["source"]] * 5, [task["target"]] * 5)
        got = rows[(task["name"], "network")]["metrics"]["clip_direction"]
        assert got["n"] == 5 and abs(got["mean"] - float(want.mean())) < 1e-5
        assert rows[(task["name"], "network")]["ms_per_image"] > 0


def test_sweeps_over_guidance_and_translators(world, tmp_path, capsys):
    w = world
    plot = tmp_path / "g.png"
    assert main(["eval", "--images", str(w["images"]), "--teacher", str(w["teacher"]), "--dino", str(w["dino"]),
                 "--clip", str(w["clip"]), "--methods", "dds", "--prompt-pair", "tolion=a photo of a cat|a photo of a lion",
                 "--sweep", "guidance=1,7.5", "--edit-steps", "2", "--plot", str(plot), "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [(r["task"], r["method"], r["sweep"]) for r in rows] == [("tolion", "dds", 1.0), ("tolion", "dds", 7.5)]
    assert plot.stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(w["translator"]), str(w["ckpt"]), "--images", str(w["images"]), "--dino", str(w["dino"]),
                 "--clip", str(w["clip"]), "--methods", "network", "--tasks", "cat2dog", "--sweep", "translators",
                 "--plot", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["sweep"] for r in rows] == ["translator", "a"]
    # the .ckpt is exported on the fly with the same EMA weights: the same scores
    assert rows[0]["metrics"]["clip_direction"]["mean"] == pytest.approx(rows[1]["metrics"]["clip_direction"]["mean"])


def test_precomputed_outputs_masks_and_fid(world, tmp_path, capsys):
    w = world
    copies, masks, targets = tmp_path / "copies", tmp_path / "masks", tmp_path / "targets"
    for d in (copies, masks, targets):
        d.mkdir()
    for p in sorted(w["images"].glob("im*.png")):
        shutil.copy(p, copies / p.name)
        Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12)[:32, :32]).save(masks / p.name)
        shutil.copy(p, targets / p.name)
    assert main(["eval", "--images", str(w["images"]), "--outputs", f"copy={copies}", "--masks", str(masks),
                 "--targets", str(targets), "--fid-features", str(w["inception"]), "--dino", str(w["dino"]),
                 "--prompt-pair", "a cat|a dog", "--methods", "identity", "--resolution", "32", "--kid-subsets", "3",
                 "--json", str(tmp_path / "o.json")]) == 0
    rows = {r["method"]: r["metrics"] for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    assert set(rows) == {"identity", "copy"}
    assert rows["copy"]["dino_structure"]["mean"] == 0.0  # lossless copies of the inputs keep all structure
    assert rows["copy"]["psnr_background"]["mean"] == pytest.approx(100.0)
    assert rows["copy"]["fid"]["value"] == pytest.approx(rows["identity"]["fid"]["value"])


def test_bad_input_gives_one_line_each(world, tmp_path, capsys):
    w = world
    base = ["eval", str(w["translator"]), "--methods", "identity", "--dino", str(w["dino"])]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"x")
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(w["images"] / "im0.png", short / "im0.png")
    cases = [
        (["--images", str(empty)], "no images there"),
        (["--images", str(broken)], "none of its 1 image files is readable"),
        (["--images", str(w["images"]), "--outputs", f"ip2p={short}"], "1 images for 5 inputs"),
        (["--images", str(w["images"]), "--clip", str(w["dino"])], "not CLIP"),
        (["--images", str(w["images"]), "--metrics", "clip_target"], "needs --clip"),
        (["--images", str(w["images"]), "--metrics", "fid", "--fid-features", str(w["inception"])], "needs --targets"),
        (["--images", str(w["images"]), "--tasks", "nope"], "unknown task"),
    ]
    capsys.readouterr()
    assert main(["eval", str(w["translator"]), "--methods", "identity", "--n", "2"]) == 1  # no --images: shapes world
    assert "--images DIR" in capsys.readouterr().err
    assert main(["eval", "--images", str(w["images"]), "--dino", str(w["dino"]), "--methods", "identity",
                 "--prompt-pair", "{caption}|a lion"]) == 1  # a per-image task and inputs without captions
    assert "fills its prompts from each image's caption" in capsys.readouterr().err
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ") and message in err[-1], (extra, err)


def test_inputs_from_shards(world, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(world["images"].glob("im*.png")):
        shutil.copy(p, src / p.name)
    assert main(["make-shards", "from-folder", str(src), str(tmp_path / "shards"), "--maxcount", "2", "--no-progress"]) == 0
    assert main(["eval", str(world["translator"]), "--shards", str(tmp_path / "shards" / "*.tar"), "--limit", "3",
                 "--dino", str(world["dino"]), "--methods", "identity", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["task"], r["n"]) for r in rows] == [("cat2lion", 3), ("cat2dog", 3)]
    assert rows[0]["metrics"]["dino_structure"]["mean"] == 0.0
