"""Export -> Translator.from_pretrained equals the module's EMA generator; integrity checks; translate CLI."""

from __future__ import annotations

import functools
import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.cli.main import main as cli
from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.export import ExportError, export_checkpoint
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule
from ddstrans.teacher import Teacher
from ddstrans.translator import Translator, TranslatorLoadError

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": ["a photo of a lion", "a lion"]},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


def _train(teacher_dir, tmp, conditioning="task_id", image_size=16):
    teacher = Teacher.from_pretrained(teacher_dir, cache_dir=tmp / "cache")
    torch.manual_seed(0)
    m = DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, conditioning=conditioning, **TINY),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5},
                             validation={"num_images": 0})
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=image_size, batch_size=2, num_train=8))
    ckpt = tmp / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return m, ckpt


@pytest.fixture(scope="module")
def trained(tiny_teacher_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    m, ckpt = _train(tiny_teacher_dir, tmp)
    out = export_checkpoint(ckpt, tmp / "translator")
    return m, ckpt, out


def _module_ema_output(m, z, task_idx):
    m.eval()
    m.swap_in_ema()
    try:
        with torch.no_grad():
            ids = torch.full((z.shape[0],), task_idx, dtype=torch.long)
            src, tgt = m.task_table.first(ids)  # the task's first prompt pair, as the translator uses
            return m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
    finally:
        m.swap_out_ema()


def test_export_layout_and_metadata(trained):
    _, _, out = trained
    info = json.loads((out / "translator.json").read_text())
    assert info["format_version"] == 1 and info["conditioning"] == "task_id" and info["weights"] == "ema"
    assert info["resolution"] == 16 and [t["name"] for t in info["tasks"]] == ["cat2lion", "cat2dog"]
    for rel in ("generator/config.json", "generator/diffusion_pytorch_model.safetensors", "tasks.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "README.md"):
        assert rel in info["files"] and (out / rel).is_file(), rel
    assert not any(p.suffix in (".bin", ".pt", ".ckpt", ".pkl") for p in out.rglob("*"))
    card = (out / "README.md").read_text()
    assert "cat2lion" in card and "Translator.from_pretrained" in card and "## Training configuration" in card


def test_translator_equals_module_ema_generator(trained):
    m, _, out = trained
    tr = Translator.from_pretrained(out)
    assert tr.tasks == ["cat2lion", "cat2dog"]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for k, name in enumerate(tr.tasks):
        ref = _module_ema_output(m, z, k)
        assert not torch.allclose(ref, z)  # trained: not the identity
        torch.testing.assert_close(tr.translate_latents(z, name), ref, atol=1e-5, rtol=0)
    # raw weights differ from EMA weights, and --no-ema exports the raw ones
    with torch.no_grad():
        raw = m.generator(z, task_ids=torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(raw, _module_ema_output(m, z, 0), atol=1e-5)


def test_no_ema_export(trained, tmp_path):
    m, ckpt, _ = trained
    tr = Translator.from_pretrained(export_checkpoint(ckpt, tmp_path / "raw", use_ema=False))
    assert tr.info["weights"] == "raw"
    z = torch.randn(2, 4, 8, 8)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(tr.translate_latents(z, "cat2dog"), m.generator(z, task_ids=torch.ones(2, dtype=torch.long)), atol=1e-5, rtol=0)


def test_pil_call_one_forward_per_batch(trained):
    _, _, out = trained
    tr = Translator.from_pretrained(out)
    calls = []
    tr.generator.register_forward_hook(lambda *a: calls.append(1))
    ims = [Image.new("RGB", (20, 30), (200, 10, 10)), Image.new("RGB", (16, 16), (10, 200, 10))]
    res = tr(ims, task="cat2lion")
    assert len(calls) == 1 and [r.size for r in res] == [(20, 30), (16, 16)]
    assert isinstance(tr(ims[0], task="cat2dog"), Image.Image)
    with pytest.raises(KeyError, match="cat2lion"):
        tr(ims, task="nope")
    with pytest.raises(ValueError, match="task-id"):
        tr(ims, source="a cat", target="a dog")


def test_tampered_files_are_refused(trained, tmp_path):
    import shutil

    _, _, out = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    w = bad / "generator" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(TranslatorLoadError, match="sha256"):
        Translator.from_pretrained(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    (bad / "generator" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TranslatorLoadError, match="unexpected"):
        Translator.from_pretrained(bad)
    (bad / "generator" / "pytorch_model.bin").unlink()
    (bad / "translator.json").write_text("{")
    with pytest.raises(TranslatorLoadError, match="JSON"):
        Translator.from_pretrained(bad)


def test_reference_teacher_instead_of_copy(trained, tmp_path):
    m, ckpt, _ = trained
    out = export_checkpoint(ckpt, tmp_path / "ref", copy_teacher=False)
    assert not (out / "vae").exists()
    tr = Translator.from_pretrained(out)
    assert tr.vae is not None
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(ckpt, out)


def test_text_conditioned_export_new_prompt_pairs(tiny_teacher_dir, tmp_path):
    m, ckpt = _train(tiny_teacher_dir, tmp_path, conditioning="text")
    out = export_checkpoint(ckpt, tmp_path / "text")
    assert (out / "text_encoder").is_dir() and (out / "tokenizer").is_dir()
    tr = Translator.from_pretrained(out)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(tr.translate_latents(z, "cat2dog"), _module_ema_output(m, z, 1), atol=1e-5, rtol=0)
    # a prompt pair never seen in training, encoded like the teacher does
    a = tr.translate_latents(z, source="a photo of a cat", target="a photo of a squirrel")
    b = tr.translate_latents(z, source="a photo of a cat", target="a photo of a dog")
    torch.testing.assert_close(b, tr.translate_latents(z, "cat2dog"), atol=1e-5, rtol=0)
    assert not torch.allclose(a, b)
    assert tr([Image.new("RGB", (16, 16))], source="a cat", target="a lion")[0].size == (16, 16)


def test_pixel_space_teacher_export(tiny_pixel_teacher_dir, tmp_path):
    m, ckpt = _train(tiny_pixel_teacher_dir, tmp_path)
    tr = Translator.from_pretrained(export_checkpoint(ckpt, tmp_path / "px"))
    assert tr.vae is None and tr.resolution == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(tr.translate_latents(x, "cat2lion"), _module_ema_output(m, x, 0), atol=1e-5, rtol=0)


def test_export_and_translate_cli(trained, tmp_path, capsys):
    _, ckpt, _ = trained
    out = tmp_path / "cli_tr"
    assert cli(["export", str(ckpt), str(out)]) == 0
    assert (out / "translator.json").is_file()
    assert cli(["export", str(ckpt), str(out)]) == 1  # no overwrite without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(inp / f"img{i}.png")
    (inp / "extra.jpg").write_bytes(b"")  # empty: unreadable
    res = tmp_path / "res"
    rc = cli(["translate", str(out), "--task", "cat2lion", str(inp / "img0.png"), str(inp / "img1.png"),
              str(inp / "img2.png"), "-o", str(res), "--batch-size", "2", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in res.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert Image.open(res / "img1.png").size == (20, 24)
    # a directory input with a bad file: the good ones are written, the bad one reported, exit code 1
    rc = cli(["translate", str(out), "--task", "cat2dog", str(inp), "-o", str(tmp_path / "res2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "extra.jpg" in err
    assert len(list((tmp_path / "res2").iterdir())) == 3
    # existing outputs are not overwritten without --overwrite
    assert cli(["translate", str(out), "--task", "cat2lion", str(inp / "img0.png"), "-o", str(res)]) == 1
    assert cli(["translate", str(out), "--task", "cat2lion", str(inp / "img0.png"), "-o", str(res), "--overwrite",
                "--no-progress"]) == 0
    assert cli(["translate", str(out), "--task", "nope", str(inp / "img0.png"), "-o", str(tmp_path / "r3")]) == 1
    assert "cat2lion" in capsys.readouterr().err
