"""ONNX export (``ddstrans export --onnx``) and ``Translator.from_pretrained(dir, backend="onnx")``: files listed and
hashed, dynamic batch and size, parity with PyTorch, tampering refused, latent translators' VAE."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ddstrans.translator import Translator, TranslatorLoadError

pytest.importorskip("onnxruntime")

PARITY_ATOL = 1e-4  # the bar: max abs error on the shapes translator, images in [-1, 1]


def test_onnx_files_are_listed_and_hashed(shapes_translator_dir):
    info = json.loads((shapes_translator_dir / "translator.json").read_text())
    assert info["onnx"]["generator"] == "onnx/generator.onnx" and info["onnx"]["dynamic_size"]
    assert "onnx/generator.onnx" in info["files"] and (shapes_translator_dir / "onnx/generator.onnx").is_file()
    assert "vae_encoder" not in info["onnx"]  # a pixel-space translator has no VAE


def test_onnx_parity_with_pytorch_dynamic_batch_and_size(shapes_translator_dir):
    pt = Translator.from_pretrained(shapes_translator_dir)
    ox = Translator.from_pretrained(shapes_translator_dir, backend="onnx")
    assert ox.backend == "onnx" and pt.backend == "torch"
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in [(1, 3, 32, 32), (5, 3, 32, 32), (2, 3, 48, 64)]:  # batch and size differ from the traced (2, 32x32)
        x = torch.rand(*shape, generator=g) * 2 - 1
        for task in ("to_blue", "to_checkered"):
            ref, got = pt.translate_tensor(x, task), ox.translate_tensor(x, task)
            assert got.shape == ref.shape
            assert not torch.allclose(ref, x, atol=1e-2)  # the generator is not the identity
            worst = max(worst, (ref - got).abs().max().item())
    print(f"ONNX vs PyTorch max abs error: {worst:.2e}")
    assert worst <= PARITY_ATOL
    # different tasks give different outputs through ONNX too (the task id reaches the graph)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert not torch.allclose(ox.translate_tensor(x, "to_blue"), ox.translate_tensor(x, "to_red"), atol=1e-3)


def test_onnx_tampered_or_missing_is_refused(shapes_translator_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shapes_translator_dir, bad)
    f = bad / "onnx" / "generator.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(TranslatorLoadError, match="onnx/generator.onnx"):
        Translator.from_pretrained(bad, backend="onnx")
    # with the torch backend's verification off, the ONNX loader still checks the file it reads
    with pytest.raises(TranslatorLoadError, match="sha256"):
        Translator.from_pretrained(bad, backend="onnx", verify=False)
    with pytest.raises(ValueError, match="backend"):
        Translator.from_pretrained(shapes_translator_dir, backend="tensorrt")


def test_no_onnx_export_says_how(tmp_path):
    from ddstrans.export import export_checkpoint
    from ddstrans.testing import make_shapes_checkpoint

    out = export_checkpoint(make_shapes_checkpoint(tmp_path / "c.ckpt"), tmp_path / "plain", examples=[])
    assert not (out / "onnx").exists() and not (out / "examples").exists()
    with pytest.raises(TranslatorLoadError, match="export --onnx"):
        Translator.from_pretrained(out, backend="onnx")


def test_latent_translator_exports_vae(tiny_teacher_dir, tmp_path):
    """A latent translator: generator + VAE encoder/decoder through onnxruntime equal PyTorch."""
    from ddstrans.export import export_checkpoint
    from ddstrans.generator import build_generator
    from ddstrans.teacher import Teacher

    teacher = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    gen = build_generator(teacher=teacher, num_tasks=1, block_out_channels=(16, 32), layers_per_block=1,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
    torch.nn.init.normal_(gen.unet.conv_out.weight, std=0.05)
    emb = teacher.encode_prompts(["a photo of a cat", "a photo of a dog"]).float()
    ckpt = {"global_step": 1, "state_dict": {f"generator.{k}": v for k, v in gen.state_dict().items()},
            "ddstrans": {"generator_config": {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in gen.config.items() if not k.startswith("_")},
                         "tasks": {"tasks": [{"name": "cat2dog", "source": ["a photo of a cat"],
                                              "target": ["a photo of a dog"], "rewrite": None}], "meta": {}},
                         "task_tensors": {"source": emb[None, :1], "target": emb[None, 1:],
                                          "n_source": torch.ones(1, dtype=torch.long),
                                          "n_target": torch.ones(1, dtype=torch.long)},
                         "teacher": {"source": "tiny", "root": str(tiny_teacher_dir), **teacher.describe()},
                         "run_config": None, "metrics": {}}}
    torch.save(ckpt, tmp_path / "c.ckpt")
    out = export_checkpoint(tmp_path / "c.ckpt", tmp_path / "latent", use_ema=False, onnx=True)
    info = json.loads((out / "translator.json").read_text())
    assert {"onnx/vae_encoder.onnx", "onnx/vae_decoder.onnx"} <= set(info["files"])
    pt, ox = Translator.from_pretrained(out), Translator.from_pretrained(out, backend="onnx")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    err = (pt.translate_tensor(x, "cat2dog") - ox.translate_tensor(x, "cat2dog")).abs().max().item()
    assert err <= PARITY_ATOL, err
    assert np.isfinite(err)


def test_text_conditioned_onnx_and_demo_prompts(tmp_path):
    """A text-conditioned shapes translator: new prompt pairs through ONNX equal PyTorch, and the demo's custom
    prompts give the translator's output."""
    from pathlib import Path

    from PIL import Image

    from ddstrans.demo import CUSTOM, DemoInputError, translate_one
    from ddstrans.export import export_checkpoint
    from ddstrans.testing import make_shapes_checkpoint

    teacher = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-teacher"
    ckpt = make_shapes_checkpoint(tmp_path / "c.ckpt", conditioning="text", teacher_root=teacher)
    out = export_checkpoint(ckpt, tmp_path / "text", onnx=True, examples=[])
    assert json.loads((out / "translator.json").read_text())["onnx"]["inputs"] == ["latents", "src_emb", "tgt_emb"]
    pt, ox = Translator.from_pretrained(out), Translator.from_pretrained(out, backend="onnx")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    kw = {"source": "a red circle on a striped background", "target": "a blue circle on a striped background"}
    ref = pt.translate_tensor(x, **kw)
    assert (ref - ox.translate_tensor(x, **kw)).abs().max().item() <= PARITY_ATOL
    other = pt.translate_tensor(x, source=kw["source"], target="a red square on a striped background")
    assert not torch.allclose(ref, other, atol=1e-3)  # the prompts reach the generator
    im = Image.fromarray((np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8))
    res = translate_one(ox, im, CUSTOM, kw["source"], kw["target"])
    assert res.images[0].tobytes() == ox(im, **kw).tobytes() and "→" in res.label
    with pytest.raises(DemoInputError, match="Type both"):
        translate_one(ox, im, CUSTOM, kw["source"], "  ")


@pytest.mark.slow
def test_bench_backends_table(shapes_translator_dir):
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_translate.py"), "--backends", "eager,onnx",
                          "--translator", str(shapes_translator_dir), "--rounds", "1", "--batch", "2"],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"onnx_over_eager=\d+\.\d\d", lines[-1]), lines[-1]
    onnx_row = next(line for line in lines if line.startswith("| onnx |"))
    assert float(onnx_row.split("|")[6]) <= PARITY_ATOL  # the max abs diff column
