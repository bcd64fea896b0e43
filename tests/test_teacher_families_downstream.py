"""Everything downstream of the teacher for SDXL, SD3 and Flux: a 3-step training, export and translation (task-id
and text-conditioned), make-shards from-teacher against the pipeline, and per-image editing."""

from __future__ import annotations

import functools
import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.cli.main import main as cli
from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.editing import EditConfig, edit_images
from ddstrans.export import export_checkpoint
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule
from ddstrans.teacher import PromptEmbeddings
from ddstrans.translator import Translator

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": ["a photo of a lion", "a lion"]},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


def _train_export(teacher, tmp, conditioning):
    torch.manual_seed(0)
    m = DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, conditioning=conditioning, **TINY),
                             loss={"guidance": 3.0}, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                             ema={"decay": 0.5}, validation={"num_images": 0})
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=6))
    ckpt = tmp / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return m, export_checkpoint(ckpt, tmp / "translator")


@pytest.mark.parametrize("name,conditioning", [("sdxl", "task_id"), ("sd3", "text"), ("flux_dev", "task_id")])
def test_smoke_train_export_translate(teachers, tmp_path, name, conditioning):
    t = teachers[name]
    m, out = _train_export(t, tmp_path, conditioning)
    assert m.generator.config.in_channels == t.latent_channels and m.generator.config.cross_attention_dim == t.context_dim
    if name != "sdxl":
        assert isinstance(m.task_table.source, PromptEmbeddings)
    info = json.loads((out / "translator.json").read_text())
    assert info["teacher"]["family"] == t.family and info["latent_shift"] == pytest.approx(t.latent_shift)
    tr = Translator.from_pretrained(out)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = t.encode_images(x)
    torch.testing.assert_close(tr.encode(x), z)  # the translator's VAE: the teacher's, shift and scale included
    torch.testing.assert_close(tr.decode(z), t.decode_latents(z))
    y = tr.translate_latents(z, "cat2dog")
    assert y.shape == z.shape and torch.isfinite(y).all() and not torch.allclose(y, z)
    if conditioning == "text":  # a new prompt pair, encoded with the exported text encoders as the teacher would
        src, tgt = tr.prompt_encoder(["a photo of a dog"]), t.encode_prompts(["a photo of a dog"])
        torch.testing.assert_close(src.hidden, tgt.hidden.float())
        torch.testing.assert_close(src.pooled, tgt.pooled.float())
        new = tr.translate_latents(z, source="a photo of a dog", target="a photo of a cat")
        assert new.shape == z.shape and torch.isfinite(new).all()
    if name != "flux_dev":  # Flux's pipeline resolution (128 latents x VAE factor) would make this call slow
        im = tr(Image.new("RGB", (20, 12), (200, 40, 40)), "cat2lion")
        assert im.size == (20, 12)


def test_generator_from_teacher_is_for_unet_teachers(teachers):
    g = build_generator(teacher=teachers["sdxl"], num_tasks=2, init_from_teacher=True)
    assert g.config.transformer_layers_per_block == [1, 2] or tuple(g.config.transformer_layers_per_block) == (1, 2)
    sd_unet = teachers["sdxl"].unet.state_dict()
    own = g.unet.state_dict()
    key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"  # second transformer layer: copied
    assert torch.equal(own[key], sd_unet[key])
    with pytest.raises(ValueError, match="UNet teacher"):
        build_generator(teacher=teachers["sd3"], num_tasks=2, init_from_teacher=True)


@pytest.mark.parametrize("name", ("sd3", "flux_dev"))
def test_make_shards_from_teacher_matches_pipeline(teachers, family_dirs, tmp_path, name):
    import webdataset as wds

    out = tmp_path / "gen"
    assert cli(["make-shards", "from-teacher", str(out), "--teacher", str(family_dirs[name]), "--prompt", "a photo of a cat",
                "--count", "1", "--seed", "5", "--steps", "2", "--guidance", "3.0", "--resolution", "16", "--format", "png",
                "--device", "cpu", "--no-progress"]) == 0
    (sample,) = list(wds.WebDataset(str(next(out.glob("shards-*.tar"))), shardshuffle=False, empty_check=False))
    mine = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=int)
    pipe = teachers[name].pipe
    ref = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(5), max_sequence_length=16).images[0]
    assert np.abs(mine - np.round(ref * 255).astype(int)).max() <= 1


@pytest.mark.parametrize("name", ("sdxl", "sd3", "flux_schnell"))
def test_edit_runs_for_each_family(teachers, name):
    t = teachers[name]
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = edit_images(t, x, "a photo of a cat", "a photo of a lion", EditConfig(steps=2, guidance=3.0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    same = edit_images(t, x, "a photo of a cat", "a photo of a cat", EditConfig(steps=2, guidance=3.0))
    torch.testing.assert_close(same, t.decode_latents(t.encode_images(x)))  # matched prompts: DDS is zero


def test_hydra_run_with_a_flow_teacher(family_dirs, tmp_path):
    from ddstrans.cli.train import compose, train

    cfg = compose(["experiment=smoke", "teacher=local", f"teacher.path_or_hub_id={family_dirs['sd3']}",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "loss.sigma_sampling=logit_normal",
                   "trainer.enable_progress_bar=false", "~callbacks.progress_bar"], tmp_path / "run")
    assert train(cfg) is not None  # the returned metric: validation ran through the flow teacher
    assert list((tmp_path / "run").rglob("val/step_*.png"))
