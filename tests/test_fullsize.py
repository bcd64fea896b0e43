"""The SD-1.5 architecture end to end: a narrow variant (every width / 10, same layout) in the default suite, and
the full-size CLI path (``scripts/bench_fullsize.py``) under ``-m fullsize``."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch

from ddstrans.arch import arch_config, make_random_sd15


def test_arch_configs_are_sd15_and_sdxl():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch_config("sd15", "unet"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet
    assert arch_config("sd15", "text_encoder")["hidden_size"] == 768  # CLIP ViT-L/14 text tower
    assert arch_config("sdxl", "unet")["transformer_layers_per_block"] == [1, 2, 10]


def test_narrow_sd15_lora_train_export_translate(tmp_path):
    from ddstrans.data.procedural import ProceduralDataModule
    from ddstrans.export import export_checkpoint
    from ddstrans.lora import build_lora_generator
    from ddstrans.module import DDSTranslationModule
    from ddstrans.teacher import Teacher
    from ddstrans.translator import Translator

    root = make_random_sd15(tmp_path / "sd15-narrow", width_divisor=10)
    ucfg = json.loads((root / "unet" / "config.json").read_text())
    assert ucfg["block_out_channels"] == [32, 64, 128, 128] and ucfg["layers_per_block"] == 2
    teacher = Teacher.from_pretrained(root, cache_dir=tmp_path / "cache")
    tasks = [{"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]
    m = DDSTranslationModule(teacher, tasks, functools.partial(build_lora_generator, rank=4),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5},
                             validation={"num_images": 0})
    assert m.generator.config.num_task_tokens == 77
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=64, batch_size=1, num_train=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    tr = Translator.from_pretrained(export_checkpoint(tmp_path / "last.ckpt", tmp_path / "translator"))
    out = tr.translate_latents(torch.randn(1, 4, 8, 8), "cat2dog")
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.fullsize
def test_fullsize_sd15_lora_cli_path(tmp_path, load_script, capsys):
    bench = load_script("bench_fullsize")
    assert bench.main(["--generators", "lora", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    train = next(r for r in res["stages"] if r["stage"] == "train (lora)")
    # one fp32 SD-1.5 UNet (3.2 GiB) + CLIP-L + VAE + activations: far below two UNets with AdamW state
    assert train["peak_rss_gib"] < 8
    assert res["counts"]["lora"]["checkpoint_params"] < 20_000_000
    assert res["counts"]["lora"]["translator_generator_params"] > 850_000_000
