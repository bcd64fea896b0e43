"""The LoRA generator on the teacher's own UNet: one copy of the weights, plain teacher with adapters off, the same
DDS step as the merged full generator, trainable-only checkpoints, resume, export + translate."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.export import export_checkpoint
from ddstrans.lora import LoRATeacherGenerator, build_lora_generator, merge_to_translation_unet
from ddstrans.module import DDSTranslationModule
from ddstrans.scores import dds_grad
from ddstrans.teacher import Teacher
from ddstrans.translator import Translator

TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


def _teacher(teacher_dir, tmp_path):
    return Teacher.from_pretrained(teacher_dir, cache_dir=tmp_path / "cache")


def _perturb(gen: LoRATeacherGenerator, seed=0):
    """Non-zero adapters and conv_out twin: a generator that is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in gen.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _module(teacher, conditioning="task_id", **kw):
    torch.manual_seed(0)
    kw.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-2))
    kw.setdefault("ema", {"decay": 0.5})
    kw.setdefault("validation", {"num_images": 0})
    gen = functools.partial(build_lora_generator, conditioning=conditioning, rank=4,
                            gradient_checkpointing=kw.pop("gradient_checkpointing", False))
    return DDSTranslationModule(teacher, TASKS, gen, **kw)


def _gen(m, z, ids):
    """The module's generator on ``z`` for tasks ``ids`` (text conditioning: the tasks' first prompt pair)."""
    src, tgt = m.task_table.first(ids)
    return m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt)


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, limit_val_batches=0,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def _dm():
    return ProceduralDataModule(image_size=16, batch_size=2, num_train=8)


def test_one_copy_identity_and_plain_teacher_with_adapters_off(tiny_teacher_dir, tmp_path):
    plain = _teacher(tiny_teacher_dir, tmp_path)
    teacher = _teacher(tiny_teacher_dir, tmp_path)
    m = _module(teacher)
    gen = m.generator
    assert gen.unet is teacher.unet  # shared, not copied
    base_ids = {id(p) for p in plain.unet.parameters()}
    assert not base_ids & {id(p) for p in gen.parameters()}
    z = torch.randn(2, 4, 8, 8)
    ids = torch.tensor([0, 1])
    assert torch.equal(_gen(m, z, ids), z)  # identity at init
    _perturb(gen)
    assert not torch.allclose(_gen(m, z, ids), z)
    t = torch.tensor([100, 700])
    emb = teacher.encode_prompts(["a photo of a lion", "a photo of a dog"])
    torch.testing.assert_close(teacher.predict_noise(z, t, emb), plain.predict_noise(z, t, emb), atol=1e-6, rtol=0)
    with gen.adapters_enabled():  # and the switch does something
        assert not torch.allclose(teacher.predict_noise(z, t, emb), plain.predict_noise(z, t, emb), atol=1e-4)
    # only the trainable tensors: adapters, conv_out twin, task tokens
    keys = list(m.state_dict())
    assert keys and all(".lora_" in k or ".conv_out.twin." in k or k == "generator.task_tokens.weight" for k in keys)
    n_trainable = sum(p.numel() for _, p in gen.trainable_named_parameters())
    assert sum(v.numel() for v in m.state_dict().values()) == n_trainable
    assert n_trainable < 0.5 * sum(p.numel() for p in plain.unet.parameters())
    # task tokens start as the tasks' target prompts
    tgt = m.task_table.target[:, 0]
    assert gen.config.num_task_tokens == tgt.shape[1]


@pytest.mark.parametrize("conditioning", ["task_id", "text"])
def test_merged_generator_gives_the_same_dds_step(tiny_teacher_dir, tmp_path, conditioning):
    teacher = _teacher(tiny_teacher_dir, tmp_path)
    m = _module(teacher, conditioning)
    _perturb(m.generator, seed=1)
    merged = merge_to_translation_unet(m.generator)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1])
    src, tgt = m.task_table.first(ids)
    with torch.no_grad():
        out_lora = m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
        out_full = merged(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
    torch.testing.assert_close(out_lora, out_full, atol=1e-5, rtol=1e-5)
    t = torch.tensor([300, 600])
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    g_lora = dds_grad(teacher, z, out_lora, src, tgt, t=t, noise=noise, guidance_scale=7.5)
    g_full = dds_grad(teacher, z, out_full, src, tgt, t=t, noise=noise, guidance_scale=7.5)
    torch.testing.assert_close(g_lora, g_full, atol=1e-5, rtol=1e-5)
    assert g_lora.abs().sum() > 0


def test_gradient_checkpointing_recomputes_with_adapters_on(tiny_teacher_dir, tmp_path):
    grads = []
    for ckpt in (False, True):
        teacher = _teacher(tiny_teacher_dir, tmp_path)
        m = _module(teacher, gradient_checkpointing=ckpt)
        _perturb(m.generator, seed=4)
        m.generator.train()
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        m.generator(z, task_ids=torch.tensor([0, 1])).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in m.generator.trainable_named_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_train_resume_export_translate(tiny_teacher_dir, tmp_path):
    teacher = _teacher(tiny_teacher_dir, tmp_path)
    m = _module(teacher)
    trainer = _trainer(tmp_path / "a", 2, enable_checkpointing=False)
    trainer.fit(m, datamodule=_dm())
    ckpt_path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    n_trainable = sum(p.numel() for _, p in m.generator.trainable_named_parameters())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == n_trainable
    assert sum(s.numel() for s in ckpt["ema"]["shadow_params"]) == n_trainable  # EMA of trainable weights only
    assert ckpt["ddstrans"]["generator_class"] == "LoRATeacherGenerator"
    assert not torch.allclose(m.generator.unet.conv_out.twin.weight, torch.zeros(()))  # it trained

    # resume: a fresh module (fresh teacher) continues from the adapters in the checkpoint
    m2 = _module(_teacher(tiny_teacher_dir, tmp_path))
    t2 = _trainer(tmp_path / "b", 3, enable_checkpointing=False)
    t2.fit(m2, datamodule=_dm(), ckpt_path=ckpt_path, weights_only=True)
    assert t2.global_step == 3

    out = export_checkpoint(ckpt_path, tmp_path / "translator")
    tr = Translator.from_pretrained(out)
    assert tr.generator.config.timestep == 0 and tr.generator.config.conditioning == "task_id"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    m.swap_in_ema()
    with torch.no_grad():
        ref = _gen(m, z, torch.zeros(2, dtype=torch.long))
    m.swap_out_ema()
    assert not torch.allclose(ref, z, atol=1e-4)
    torch.testing.assert_close(tr.translate_latents(z, "cat2lion"), ref, atol=1e-5, rtol=1e-5)


def test_bad_lora_settings_one_line(tiny_teacher_dir, tmp_path):
    teacher = _teacher(tiny_teacher_dir, tmp_path)
    with pytest.raises(ValueError, match=r"target_modules \['to_qq'\] match no module"):
        build_lora_generator(teacher=teacher, target_modules=["to_q", "to_qq"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        build_lora_generator(teacher=teacher, rank=0)
    with pytest.raises(ValueError, match="conv_out"):
        build_lora_generator(teacher=teacher, target_modules=["conv_out"])
    assert not any(".lora_" in n for n, _ in teacher.unet.named_parameters())  # nothing injected on failure


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from ddstrans.testing import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("lora_sdxl") / "sdxl")


def test_sdxl_generator_passes_added_conditioning_and_teacher_stays_plain(sdxl_dir, tmp_path):
    from ddstrans.generator import added_conditioning

    plain = _teacher(sdxl_dir, tmp_path)
    teacher = _teacher(sdxl_dir, tmp_path)
    m = _module(teacher)
    gen = m.generator
    assert gen.unet is teacher.unet and gen.config.added_conditioning == "text_time"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1])
    assert torch.equal(_gen(m, z, ids), z)  # identity at init
    added = added_conditioning(gen, z, ids)
    torch.testing.assert_close(added["time_ids"], teacher.time_ids(8, 8).expand(2, -1))  # the teacher's time ids
    torch.testing.assert_close(added["text_embeds"], m.task_table.target[:, 0].pooled)  # initialised from the target
    _perturb(gen, seed=7)
    assert not torch.allclose(_gen(m, z, ids), z, atol=1e-4)
    t = torch.tensor([100, 700])
    emb = teacher.encode_prompts(["a photo of a lion", "a photo of a dog"])
    torch.testing.assert_close(teacher.predict_noise(z, t, emb), plain.predict_noise(z, t, emb), atol=1e-6, rtol=0)
    with gen.adapters_enabled():
        assert not torch.allclose(teacher.predict_noise(z, t, emb), plain.predict_noise(z, t, emb), atol=1e-4)
    assert any(k.startswith("generator.task_pooled.") for k in m.state_dict())  # trained and checkpointed


@pytest.mark.parametrize("conditioning", ["task_id", "text"])
def test_sdxl_train_export_translate(sdxl_dir, tmp_path, conditioning):
    teacher = _teacher(sdxl_dir, tmp_path)
    m = _module(teacher, conditioning)
    trainer = _trainer(tmp_path / "a", 1, enable_checkpointing=False)
    trainer.fit(m, datamodule=_dm())
    ckpt_path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt_path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ids = torch.zeros(2, dtype=torch.long)
    m.swap_in_ema()
    with torch.no_grad():
        ref = _gen(m, z, ids)
    m.swap_out_ema()
    assert not torch.allclose(ref, z, atol=1e-5)  # one step moved it
    merged = Translator.from_pretrained(export_checkpoint(ckpt_path, tmp_path / "merged", examples=[]))
    separate = Translator.from_pretrained(export_checkpoint(ckpt_path, tmp_path / "separate", examples=[],
                                                            merge_adapters=False))
    for tr in (merged, separate):
        torch.testing.assert_close(tr.translate_latents(z, "cat2lion"), ref, atol=1e-5, rtol=1e-5)
    if conditioning == "text":  # a new prompt pair through the exported SDXL text encoders (pooled included)
        out = merged.translate_latents(z, source="a photo of a dog", target="a photo of a cat")
        assert out.shape == z.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("conditioning", ["task_id", "text"])
def test_pooled_text_teacher_shapes(conditioning):
    # the shipped shapes teacher's UNet pools its context tokens into the time embedding (addition_embed_type
    # "text"): the generator feeds it its own tokens, and the merged network keeps that embedding
    from ddstrans.shapes.defaults import load_shapes_teacher

    teacher = load_shapes_teacher()
    assert teacher.model.config.addition_embed_type == "text"
    tasks = [{"name": "to_blue", "source": "a red circle on a striped background",
              "target": "a blue circle on a striped background"},
             {"name": "to_square", "source": "a red circle on a striped background",
              "target": "a red square on a striped background"}]
    torch.manual_seed(0)
    m = DDSTranslationModule(teacher, tasks, functools.partial(build_lora_generator, conditioning=conditioning, rank=4),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), validation={"num_images": 0})
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1])
    src, tgt = m.task_table.first(ids)
    t = torch.tensor([300, 600])
    ctx = getattr(tgt, "hidden_states", tgt)
    with torch.no_grad():
        plain = teacher.model(z, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt), z)  # identity at init
        _perturb(m.generator, seed=2)
        again = teacher.model(z, t, encoder_hidden_states=ctx).sample
        out = m.generator(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
        merged = merge_to_translation_unet(m.generator)(z, task_ids=ids, src_emb=src, tgt_emb=tgt)
    torch.testing.assert_close(again, plain)  # adapters off between generator calls: the plain teacher
    assert (out - z).abs().max() > 1e-3
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)
