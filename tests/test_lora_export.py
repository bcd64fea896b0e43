"""LoRA translators that keep the adapters separate: the base teacher referenced by directory and UNet hash, the
same outputs as the merged export, refusal of another base, a clear error without one."""

from __future__ import annotations

import functools
import json
import shutil

import lightning as L
import pytest
import torch

from ddstrans.cli.main import main as cli
from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.export import ExportError, export_checkpoint
from ddstrans.lora import build_lora_generator
from ddstrans.lora_export import BaseTeacherError, unet_sha256
from ddstrans.module import DDSTranslationModule
from ddstrans.teacher import Teacher
from ddstrans.translator import Translator, TranslatorLoadError

TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


@pytest.fixture(scope="module")
def lora_ckpt(tiny_teacher_dir, tmp_path_factory):
    """A 2-step LoRA checkpoint on a private copy of the tiny teacher (tests below move and alter that copy)."""
    tmp = tmp_path_factory.mktemp("lora_export")
    teacher_dir = tmp / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher_dir)
    torch.manual_seed(0)
    m = DDSTranslationModule(Teacher.from_pretrained(teacher_dir, cache_dir=tmp / "cache"), TASKS,
                             functools.partial(build_lora_generator, rank=4),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5},
                             validation={"num_images": 0})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=4))
    ckpt = tmp / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    merged = export_checkpoint(ckpt, tmp / "merged", examples=[])
    separate = export_checkpoint(ckpt, tmp / "separate", merge_adapters=False, examples=[])
    return {"ckpt": ckpt, "teacher": teacher_dir, "merged": merged, "separate": separate, "tmp": tmp}


def _size(d) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_separate_equals_merged_and_is_small(lora_ckpt):
    sep, mer = lora_ckpt["separate"], lora_ckpt["merged"]
    info = json.loads((sep / "translator.json").read_text())
    base = info["adapters"]["base"]
    assert base["path"] == str(lora_ckpt["teacher"].resolve()) and len(base["unet_sha256"]) == 64
    assert "generator/adapters.safetensors" in info["files"]
    assert not (sep / "generator" / "diffusion_pytorch_model.safetensors").exists()
    a, b = Translator.from_pretrained(sep), Translator.from_pretrained(mer)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for task in ("cat2lion", "cat2dog"):
        out = a.translate_latents(z, task)
        assert not torch.allclose(out, z, atol=1e-4)  # trained: not the identity
        torch.testing.assert_close(out, b.translate_latents(z, task), atol=1e-5, rtol=1e-5)
    # the generator part alone (the VAE is copied into both): adapters + conv_out twin + task tokens
    gen_sep, gen_mer = _size(sep / "generator"), _size(mer / "generator")
    assert gen_sep < 0.5 * gen_mer, (gen_sep, gen_mer)


def test_wrong_base_is_refused_and_moved_base_is_found(lora_ckpt, tmp_path):
    from diffusers import UNet2DConditionModel

    other = tmp_path / "other"
    unet = UNet2DConditionModel.from_pretrained(lora_ckpt["teacher"] / "unet")
    with torch.no_grad():
        unet.conv_in.bias.add_(1e-3)  # one tensor differs slightly
    unet.save_pretrained(other / "unet")
    with pytest.raises(BaseTeacherError, match=r"^base='.*other': its UNet weights hash to .* give the matching base$"):
        Translator.from_pretrained(lora_ckpt["separate"], base=other)
    # the right weights, elsewhere and re-saved (another file layout): accepted by hash
    moved = tmp_path / "moved"
    UNet2DConditionModel.from_pretrained(lora_ckpt["teacher"] / "unet").save_pretrained(moved / "unet")
    tr = Translator.from_pretrained(lora_ckpt["separate"], base=moved)
    assert tr.generator.config.conditioning == "task_id"
    assert unet_sha256(unet) != json.loads((lora_ckpt["separate"] / "translator.json").read_text())[
        "adapters"]["base"]["unet_sha256"]


def test_missing_base_gives_one_clear_line(lora_ckpt, tmp_path, capsys):
    with pytest.raises(BaseTeacherError, match=r"base='.*nowhere' has no unet/ folder"):
        Translator.from_pretrained(lora_ckpt["separate"], base=tmp_path / "nowhere")
    copy = tmp_path / "tr"
    shutil.copytree(lora_ckpt["separate"], copy)
    info = json.loads((copy / "translator.json").read_text())
    info["adapters"]["base"]["path"] = str(tmp_path / "gone")  # the recorded teacher moved away
    (copy / "translator.json").write_text(json.dumps(info))
    with pytest.raises(TranslatorLoadError, match=r"base teacher is not at .*gone.*give base") as e:
        Translator.from_pretrained(copy)
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "in.png")
    assert cli(["translate", str(copy), str(tmp_path / "in.png"), "-o", str(out), "--task", "cat2lion",
                "--device", "cpu", "--no-progress"]) != 0
    assert "pass --base DIR" in capsys.readouterr().err
    assert cli(["translate", str(copy), str(tmp_path / "in.png"), "-o", str(out), "--task", "cat2lion",
                "--device", "cpu", "--no-progress", "--base", str(lora_ckpt["teacher"])]) == 0
    assert list(out.glob("*.png"))


def test_cli_keep_adapters_and_bad_combinations(lora_ckpt, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["export", str(lora_ckpt["ckpt"]), str(out), "--keep-adapters"]) == 0
    assert json.loads((out / "translator.json").read_text())["format_version"] == 2
    with pytest.raises(ExportError, match="onnx=True and merge_adapters=False exclude each other"):
        export_checkpoint(lora_ckpt["ckpt"], tmp_path / "x", merge_adapters=False, onnx=True)
    assert cli(["export", str(lora_ckpt["ckpt"]), str(tmp_path / "y"), "--keep-adapters", "--onnx"]) != 0
    assert "error: --onnx and --keep-adapters exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
