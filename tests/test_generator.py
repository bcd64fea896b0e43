"""TranslationUNet (identity at init, both conditionings, save/load, teacher init), TaskTable, schedules."""

from __future__ import annotations

import pytest
import torch

from ddstrans.generator import TranslationUNet, build_generator, grid_fourier_features
from ddstrans.schedules import guidance_at, phase_steps_increase, phase_value, t_range_at, weight_at
from ddstrans.tasks import Task, TaskTable, as_tasks

TINY = dict(
    sample_size=8, cross_attention_dim=32, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4, norm_num_groups=8,
)


def _cond(b, L=12, D=32):
    g = torch.Generator().manual_seed(0)
    return dict(task_ids=torch.arange(b) % 3, src_emb=torch.randn(b, L, D, generator=g), tgt_emb=torch.randn(b, L, D, generator=g))


@pytest.mark.parametrize("conditioning,channels", [("task_id", 4), ("text", 4), ("task_id", 3)])
def test_identity_at_init(conditioning, channels):
    torch.manual_seed(0)
    g = TranslationUNet(in_channels=channels, conditioning=conditioning, num_tasks=3, **TINY)
    z = torch.randn(2, channels, 8, 8)
    assert torch.equal(g(z, **_cond(2)), z)


def test_conditioning_changes_output_after_residual_is_nonzero():
    torch.manual_seed(0)
    g = TranslationUNet(conditioning="task_id", num_tasks=3, **TINY)
    torch.nn.init.normal_(g.unet.conv_out.weight, std=0.1)
    z = torch.randn(1, 4, 8, 8)
    a = g(z, task_ids=torch.tensor([0]))
    b = g(z, task_ids=torch.tensor([1]))
    assert not torch.allclose(a, b)
    t = TranslationUNet(conditioning="text", **TINY)
    torch.nn.init.normal_(t.unet.conv_out.weight, std=0.1)
    c = _cond(1)
    assert not torch.allclose(t(z, src_emb=c["src_emb"], tgt_emb=c["tgt_emb"]), t(z, src_emb=c["tgt_emb"], tgt_emb=c["src_emb"]))
    with pytest.raises(ValueError, match="src_emb"):
        t(z)


def test_save_load_roundtrip_safetensors(tmp_path):
    torch.manual_seed(0)
    g = TranslationUNet(conditioning="text", text_mode="delta", **TINY)
    torch.nn.init.normal_(g.unet.conv_out.weight, std=0.1)
    g.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "diffusion_pytorch_model.safetensors").is_file()
    g2 = TranslationUNet.from_pretrained(tmp_path / "g", use_safetensors=True)
    z, c = torch.randn(2, 4, 8, 8), _cond(2)
    assert g2.config.text_mode == "delta"
    torch.testing.assert_close(g(z, **c), g2(z, **c))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    g = TranslationUNet(conditioning="task_id", num_tasks=3, **TINY)
    torch.nn.init.normal_(g.unet.conv_out.weight, std=0.1)
    z, c = torch.randn(2, 4, 8, 8), _cond(2)
    g.train()
    g(z, **c).square().sum().backward()
    ref = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    g.enable_gradient_checkpointing()
    assert g.is_gradient_checkpointing
    g(z, **c).square().sum().backward()
    for a, p in zip(ref, g.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_build_from_teacher_copies_weights_and_stays_identity(tiny_teacher):
    g = build_generator(teacher=tiny_teacher, num_tasks=2, conditioning="task_id", init_from_teacher=True)
    tsd = tiny_teacher.unet.state_dict()
    gsd = g.unet.state_dict()
    assert torch.equal(gsd["down_blocks.1.attentions.0.proj_in.weight"], tsd["down_blocks.1.attentions.0.proj_in.weight"])
    assert g.config.cross_attention_dim == tiny_teacher.unet.config.cross_attention_dim
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(g(z, task_ids=torch.tensor([1])), z)


def test_task_table_build_sample_save_load(tiny_teacher, tmp_path):
    tasks = [{"name": "cat2lion", "source": ["a cat", "a photo of a cat"], "target": "a lion"},
             Task("cat2dog", "a cat", ["a dog", "a photo of a dog", "the dog"])]
    table = TaskTable.build(tasks, tiny_teacher)
    assert table.names == ["cat2lion", "cat2dog"]
    assert table.source.shape[:2] == (2, 2) and table.target.shape[:2] == (2, 3)
    torch.testing.assert_close(table.target[1, 2], tiny_teacher.encode_prompts(["the dog"])[0].float())
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        s, t = table.sample(torch.tensor([1, 1]), g)
        for row in t:
            seen.add(min(range(3), key=lambda k: (table.target[1, k] - row).abs().sum().item()))
    assert seen == {0, 1, 2}  # every target variant of cat2dog is sampled
    table.save(tmp_path / "t.safetensors", tmp_path / "t.json")
    back = TaskTable.load(tmp_path / "t.safetensors", tmp_path / "t.json")
    assert back.names == table.names and torch.equal(back.source, table.source)
    with pytest.raises(KeyError, match="cat2dog"):
        back.index("nope")
    with pytest.raises(ValueError, match="unique"):
        as_tasks([{"name": "a", "source": "x", "target": "y"}] * 2)


def test_schedules():
    assert guidance_at(0, 7.5, 1.0, 100) == 1.0
    assert guidance_at(50, 7.5, 1.0, 100) == pytest.approx(4.25)
    assert guidance_at(100, 7.5, 1.0, 100) == 7.5 == guidance_at(10**6, 7.5, 1.0, 100)
    assert guidance_at(0, 7.5) == 7.5
    assert guidance_at(50, 7.5, 1.0, 100, "cosine") == pytest.approx(4.25)
    assert t_range_at(0, (50, 950)) == (50, 950)
    assert t_range_at(5, (200, 950), (50, 500), 10) == (125, 725)
    assert t_range_at(99, (200, 950), (50, 500), 10) == (50, 500)
    assert [weight_at(s, 5.0, 1000, 200) for s in (0, 999, 1000, 1100, 1200, 10**6)] == [0, 0, 0, 2.5, 5.0, 5.0]
    assert weight_at(0, 2.0) == 2.0 and weight_at(9, 2.0, 10) == 0 and weight_at(10, 2.0, 10) == 2.0
    phases = ((100, 0.3), (200, 0.1))
    assert [phase_value(s, 1.0, phases) for s in (0, 99, 100, 199, 200, 10**6)] == [1.0, 1.0, 0.3, 0.3, 0.1, 0.1]
    assert phase_value(5, 2.0) == 2.0
    assert phase_steps_increase(phases) and phase_steps_increase(())
    assert not any(phase_steps_increase(p) for p in (((200, 0.1), (100, 0.3)), ((100, 0.3), (100, 0.1)), ((-1, 0.3),)))


def test_text_pooling_modulates_every_resnet_block():
    """With text_pooling the prompts reach the time embedding (not only cross-attention): a generator whose
    cross-attention is switched off still responds to them; without pooling it does not."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    c = _cond(1)
    outs = {}
    for pooling in (True, False):
        g = TranslationUNet(conditioning="text", text_pooling=pooling, **TINY)
        torch.nn.init.normal_(g.unet.conv_out.weight, std=0.1)
        for name, mod in g.unet.named_modules():
            if name.endswith("attn2"):  # cross-attention layers -> contribute nothing
                torch.nn.init.zeros_(mod.to_out[0].weight)
                torch.nn.init.zeros_(mod.to_out[0].bias)
        outs[pooling] = (g(z, src_emb=c["src_emb"], tgt_emb=c["tgt_emb"]), g(z, src_emb=c["tgt_emb"], tgt_emb=c["src_emb"]))
        assert (getattr(g.unet, "add_embedding", None) is not None) == pooling
    assert not torch.allclose(*outs[True])
    assert torch.allclose(*outs[False])


def test_grid_fourier_features_are_periodic_sin_cos_of_the_pixel_grid():
    f = grid_fourier_features(6, 8, 2)
    assert f.shape == (8, 6, 8)
    x = torch.arange(8.0)
    torch.testing.assert_close(f[1, 3], torch.sin(2 * torch.pi * 2 * x / 8))  # x, k=2, sin; same on every row
    torch.testing.assert_close(f[2, :, 0], torch.ones(6))  # x, k=1, cos: 1 in the first column
    torch.testing.assert_close(f[4 + 1, :, 5], torch.sin(2 * torch.pi * 2 * torch.arange(6.0) / 6))  # y, k=2, sin
    with pytest.raises(ValueError, match="frequencies"):
        grid_fourier_features(4, 4, 0)


def test_position_features_are_extra_input_channels_of_the_unet(tmp_path):
    """With ``position_frequencies`` the UNet sees the grid features beside the image: the generator equals a plain
    one whose first convolution has the same image weights, plus the features' contribution. Still the identity at
    init, and the option survives save/load."""
    torch.manual_seed(0)
    pos = TranslationUNet(in_channels=3, num_tasks=2, position_frequencies=2, **TINY)
    z, ids = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    assert torch.equal(pos(z, task_ids=ids), z)
    assert pos.unet.conv_in.in_channels == 3 + 8
    torch.nn.init.normal_(pos.unet.conv_out.weight, std=0.1)
    plain = TranslationUNet(in_channels=3, num_tasks=2, **TINY)
    sd = dict(pos.state_dict())
    sd["unet.conv_in.weight"] = sd["unet.conv_in.weight"][:, :3]
    plain.load_state_dict(sd)
    with torch.no_grad():
        pos.unet.conv_in.weight[:, 3:] = 0  # features ignored: the plain generator
        torch.testing.assert_close(pos(z, task_ids=ids), plain(z, task_ids=ids))
        pos.unet.conv_in.weight[:, 3:].normal_(std=0.1)  # features used: the output changes
        assert not torch.allclose(pos(z, task_ids=ids), plain(z, task_ids=ids))
    pos.save_pretrained(tmp_path / "g")
    again = TranslationUNet.from_pretrained(tmp_path / "g")
    assert again.config.position_frequencies == 2
    torch.testing.assert_close(again(z, task_ids=ids), pos(z, task_ids=ids))


def test_changed_mode_marks_what_differs_and_carries_nothing_of_the_source():
    """``text_mode="changed"``: tokens ``[tgt, w * tgt]``; the same target asked from two different sources that
    differ from it at the same positions gives the same tokens, and a prompt pair that agrees gives ``w = 0``."""
    from ddstrans.generator import change_weights, conditioning_tokens

    torch.manual_seed(0)
    g = TranslationUNet(conditioning="text", text_mode="changed", **TINY)
    L, D = 5, g.config.cross_attention_dim
    tgt = torch.randn(1, L, D)
    src_a, src_b = tgt.clone(), tgt.clone()
    src_a[:, 2] += torch.randn(D)
    src_b[:, 2] += 2 * torch.randn(D)
    w = change_weights(src_a, tgt)
    assert w.shape == (1, L, 1) and w[0, 2, 0] == 1 and w[0, [0, 1, 3, 4], 0].abs().max() == 0
    tok_a = conditioning_tokens(g, 1, None, src_emb=src_a, tgt_emb=tgt)
    tok_b = conditioning_tokens(g, 1, None, src_emb=src_b, tgt_emb=tgt)
    torch.testing.assert_close(tok_a, tok_b)
    assert tok_a.shape == (1, 2 * L, D)
    same = conditioning_tokens(g, 1, None, src_emb=tgt, tgt_emb=tgt)
    torch.testing.assert_close(same[:, L:], g.segment[1].expand(1, L, D))  # nothing asked to change
