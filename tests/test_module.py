"""DDSTranslationModule: teacher outside state_dict/checkpoints, DDS steps train the generator, EMA in
checkpoints, non-finite steps skipped, validation grid."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule, _resolve_dtype
from ddstrans.scores import ScoreInfo, shared_noise

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": ["a photo of a cat", "a cat"], "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]


def make_module(teacher, conditioning="task_id", **kw):
    torch.manual_seed(0)
    kw.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-3))
    kw.setdefault("ema", {"decay": 0.9})
    kw.setdefault("loss", {"warmup_steps": 2, "guidance_start": 1.0})
    return DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, conditioning=conditioning, **TINY), **kw)


def make_trainer(tmp_path, steps=3, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, val_check_interval=steps, check_val_every_n_epoch=None,
                     num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **kw)


def dm():
    return ProceduralDataModule(image_size=16, batch_size=2, num_train=16, num_val=2)


def test_teacher_outside_state_dict(tiny_teacher):
    m = make_module(tiny_teacher)
    keys = list(m.state_dict())
    assert keys and all(k.startswith("generator.") for k in keys)
    assert not any(p is q for p in m.parameters() for q in tiny_teacher.unet.parameters())
    assert "teacher" not in dict(m.named_children())
    n_teacher = sum(p.numel() for p in tiny_teacher.unet.parameters())
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.generator.parameters())
    assert n_teacher > 0


@pytest.mark.parametrize("conditioning", ["task_id", "text"])
def test_dds_steps_change_generator_and_checkpoint_has_no_teacher(tiny_teacher, tmp_path, conditioning):
    m = make_module(tiny_teacher, conditioning)
    z = torch.randn(2, 4, 8, 8)
    ids = torch.tensor([0, 1])

    def translate(z):
        return m.generator(z, task_ids=ids, src_emb=m.task_table.first(ids)[0], tgt_emb=m.task_table.first(ids)[1])

    assert torch.equal(translate(z), z)  # identity at init
    trainer = make_trainer(tmp_path)
    trainer.fit(m, datamodule=dm())
    m.eval()
    assert not torch.allclose(translate(z), z)
    assert m.generator.unet.conv_out.weight.abs().sum() > 0
    metrics = trainer.callback_metrics
    for k in ("train/loss_dds", "train/grad_norm", "train/guidance", "train/nonfinite", "val/dds_norm"):
        assert k in metrics, k
    assert float(metrics["train/guidance"]) == pytest.approx(7.5)  # warm-up (2 steps) finished
    assert list((tmp_path / "val").glob("step_*.png"))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ck = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert all(k.startswith("generator.") for k in ck["state_dict"])
    assert "ema" in ck and ck["ddstrans"]["tasks"]["tasks"][0]["name"] == "cat2lion"
    n_teacher = len(tiny_teacher.unet.state_dict())
    assert len(ck["state_dict"]) < n_teacher + len(m.generator.state_dict())


def test_sds_logs_its_own_loss(tiny_teacher, tmp_path):
    m = make_module(tiny_teacher, loss={"method": "sds"})
    trainer = make_trainer(tmp_path, steps=2)
    trainer.fit(m, datamodule=dm())
    assert "train/loss_sds" in trainer.callback_metrics


def test_nonfinite_steps_are_skipped(tiny_teacher, tmp_path):
    m = make_module(tiny_teacher)
    before = {k: v.clone() for k, v in m.generator.state_dict().items()}

    from ddstrans.guidance import Guidance

    class NaNGuidance(Guidance):
        def grad(self, teacher, z_src, z_tgt, *a, **k):
            return torch.full_like(z_tgt, float("nan")), ScoreInfo(torch.tensor(0), torch.zeros(len(z_tgt)), z_tgt)

    m.guidance = NaNGuidance.from_mapping(m.guidance.to_dict())
    trainer = make_trainer(tmp_path, steps=2, limit_val_batches=0)
    trainer.fit(m, datamodule=dm())
    assert m.skipped_steps == 2
    for k, v in m.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_nonfinite_batch_skips_its_whole_accumulation_window(tiny_teacher, tmp_path):
    """With 2 batches per optimizer step the first of each is NaN: its NaN gradient is summed into the step, so
    the step must be skipped although the window's last batch is finite; each skipped step counts once."""
    m = make_module(tiny_teacher)
    before = {k: v.clone() for k, v in m.generator.state_dict().items()}

    from ddstrans.guidance import Guidance

    calls = []

    class FirstOfTwoNaN(Guidance):
        def grad(self, teacher, z_src, z_tgt, *a, **k):
            calls.append(1)
            g, info = super().grad(teacher, z_src, z_tgt, *a, **k)
            return (g * float("nan") if len(calls) % 2 else g), info

    m.guidance = FirstOfTwoNaN.from_mapping(m.guidance.to_dict())
    trainer = make_trainer(tmp_path, steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(m, datamodule=dm())
    assert len(calls) == 4 and m.skipped_steps == 2
    for k, v in m.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_saved_and_restored(tiny_teacher, tmp_path):
    m = make_module(tiny_teacher)
    trainer = make_trainer(tmp_path, steps=3)
    trainer.fit(m, datamodule=dm())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ema_sd = m.ema_state_dict()
    raw_sd = m.generator.state_dict()
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in raw_sd)
    m2 = make_module(tiny_teacher)
    ck = torch.load(tmp_path / "a.ckpt", weights_only=False)
    m2.load_state_dict(ck["state_dict"])
    m2.on_load_checkpoint(ck)
    for k, v in m2.ema_state_dict().items():
        torch.testing.assert_close(v, ema_sd[k])


def test_latents_in_batch_skip_the_vae(tiny_teacher):
    m = make_module(tiny_teacher)
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(m.encode({"latents": z, "pixels": None}), z)


def test_teacher_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _resolve_dtype("auto", cpu, "bf16-mixed") == torch.float32
    assert _resolve_dtype("auto", cuda, "bf16-mixed") == torch.bfloat16
    assert _resolve_dtype("auto", cuda, "16-mixed") == torch.float16
    assert _resolve_dtype("float16", cpu, "32") == torch.float16


def spy_training_steps(m) -> tuple[list, list]:
    """Spies on ``m``'s training steps: each step's task ids (through its training noise) and the keyword arguments
    its score is called with (training only: validation scores a fixed (t, noise) of its own)."""
    ids, calls = [], []
    training_noise, score = m.training_noise, m.score

    def spy_noise(z, task_ids, rng):
        ids.append(task_ids.clone())
        return training_noise(z, task_ids, rng)

    def spy_score(*args, **kw):
        if m.training:
            calls.append(dict(kw))
        return score(*args, **kw)

    m.training_noise, m.score = spy_noise, spy_score
    return ids, calls


@pytest.mark.parametrize("prob,tasks", [(0.0, None), (1.0, None), (1.0, ["cat2dog"])])
def test_shared_noise_reaches_the_score(tiny_teacher, tmp_path, prob, tasks):
    m = make_module(tiny_teacher, loss={"warmup_steps": 2, "guidance_start": 1.0, "shared_noise_prob": prob,
                                        "shared_noise_seed": 3, "shared_noise_tasks": tasks})
    ids, calls = spy_training_steps(m)
    make_trainer(tmp_path, steps=6).fit(m, datamodule=dm())
    seen = [kw.get("noise") for kw in calls]
    assert len(seen) == len(ids) == 6
    if prob == 0.0:  # fresh noise, drawn inside the score
        assert all(n is None for n in seen)
        return
    want = shared_noise(seen[0].shape[1:], 3)
    is_shared = [torch.equal(x, want) for n in seen for x in n]
    if tasks is None:  # every sample of every step: the seed's one noise tensor
        assert all(is_shared)
    else:  # only the samples of cat2dog (task 1)
        task_of = [int(i) for step_ids in ids for i in step_ids]
        assert is_shared == [t == 1 for t in task_of] and 0 < sum(is_shared) < len(is_shared)


def test_guidance_low_tasks_flag_the_samples_of_those_tasks(tiny_teacher, tmp_path):
    m = make_module(tiny_teacher, loss={"guidance_low_t": 1000, "guidance_low": 2.0, "guidance_low_tasks": ["cat2dog"]})
    ids, calls = spy_training_steps(m)
    make_trainer(tmp_path, steps=4).fit(m, datamodule=dm())
    flags = [kw["low_eligible"] for kw in calls]
    assert [f.tolist() for f in flags] == [(i == 1).tolist() for i in ids]  # cat2dog is task 1
    assert 0 < sum(int(f.sum()) for f in flags) < sum(len(f) for f in flags)
    with pytest.raises(KeyError, match="cat2lion"):
        make_module(tiny_teacher, loss={"guidance_low_tasks": ["cat2cow"]})


def test_an_anneal_without_steps_is_reported(tiny_teacher):
    with pytest.warns(UserWarning, match="t_range_end.*ignored"):
        make_module(tiny_teacher, loss={"t_range_end": [20, 300], "t_range_steps": -1})


def test_shared_noise_options_are_checked(tiny_teacher):
    with pytest.raises(ValueError, match="shared_noise_prob"):
        make_module(tiny_teacher, loss={"shared_noise_prob": 2.0})
    with pytest.raises(KeyError, match="cat2lion"):
        make_module(tiny_teacher, loss={"shared_noise_prob": 1.0, "shared_noise_tasks": ["cat2cow"]})


def record_task_ids(m, monkeypatch) -> list:
    """The task ids ``m`` draws at each training step, in order (a spy on its task table)."""
    ids, sample = [], m.task_table.embeddings_for

    def spy(task_ids, *a, **kw):
        ids.append(task_ids.clone())
        return sample(task_ids, *a, **kw)

    monkeypatch.setattr(m.task_table, "embeddings_for", spy)
    return ids


def test_palette_term_joins_at_its_step_for_its_tasks(tiny_teacher, tmp_path, monkeypatch):
    """loss.palette_*: no term before palette_start, then weight ramped to palette_weight, per-sample flags of
    palette_tasks only; bad options refused."""
    import ddstrans.module as module

    m = make_module(tiny_teacher, loss={"warmup_steps": 2, "guidance_start": 1.0, "palette_weight": 4.0,
                                        "palette_start": 2, "palette_ramp_steps": 2, "palette_tasks": ["cat2dog"]})
    assert [m.current_palette_weight(s) for s in range(5)] == [0.0, 0.0, 0.0, 2.0, 4.0]
    calls, ids, palette_loss = [], record_task_ids(m, monkeypatch), module.palette_loss

    def spy_palette(z_tgt, z_src, weight=None):
        calls.append((m.global_step, weight.clone()))
        return palette_loss(z_tgt, z_src, weight)

    monkeypatch.setattr(module, "palette_loss", spy_palette)
    make_trainer(tmp_path, steps=5).fit(m, datamodule=dm())
    assert [s for s, _ in calls] == [3, 4]  # weight 0 at steps 0-2: not computed
    for (step, weight) in calls:
        assert weight.tolist() == [i == 1 for i in ids[step].tolist()]  # cat2dog's samples only
    with pytest.raises(ValueError, match="palette_weight"):
        make_module(tiny_teacher, loss={"palette_weight": -1.0})
    with pytest.raises(KeyError, match="cat2lion"):
        make_module(tiny_teacher, loss={"palette_weight": 1.0, "palette_tasks": ["cat2cow"]})


def test_identity_term_applies_to_its_tasks_only(tiny_teacher, tmp_path, monkeypatch):
    """loss.identity_tasks: the identity term gets per-sample flags of those tasks (None: no flags, every task)."""
    import ddstrans.module as module

    calls, identity_loss = [], module.identity_loss

    def spy_identity(z_tgt, z_src, grad, reduction="hw", weight=None):
        calls.append(None if weight is None else weight.clone())
        return identity_loss(z_tgt, z_src, grad, reduction, weight)

    monkeypatch.setattr(module, "identity_loss", spy_identity)
    m = make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_tasks": ["cat2dog"]})
    ids = record_task_ids(m, monkeypatch)
    make_trainer(tmp_path, steps=3).fit(m, datamodule=dm())
    assert len(calls) == 3
    for flags, task_ids in zip(calls, ids):
        assert flags.tolist() == [i == 1 for i in task_ids.tolist()]  # cat2dog's samples only
    calls.clear()
    make_trainer(tmp_path / "all", steps=1).fit(make_module(tiny_teacher, loss={"identity_weight": 0.5}), datamodule=dm())
    assert calls == [None]
    with pytest.raises(KeyError, match="cat2lion"):
        make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_tasks": ["cat2cow"]})
    # loss.identity_tasks_start: every task (no flags) before that step, the tasks' flags from it on
    calls.clear()
    m = make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_tasks": ["cat2dog"], "identity_tasks_start": 2})
    ids = record_task_ids(m, monkeypatch)
    make_trainer(tmp_path / "late", steps=4).fit(m, datamodule=dm())
    assert calls[:2] == [None, None]
    assert [f.tolist() for f in calls[2:]] == [[i == 1 for i in t.tolist()] for t in ids[2:4]]
    with pytest.raises(ValueError, match="identity_tasks_start"):
        make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_tasks_start": -1})


def test_identity_weight_phases_set_the_term_weight_per_step(tiny_teacher, tmp_path, monkeypatch):
    """loss.identity_weight_phases: from each phase's step on, the identity term enters the loss at that phase's
    weight (identity_weight before the first; not computed at weight 0); bad phases refused naming the option."""
    import ddstrans.module as module

    m = make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_weight_phases": [[1, 0.0], [2, 2.0]]})
    assert [m.current_identity_weight(s) for s in range(4)] == [0.5, 0.0, 2.0, 2.0]
    steps_computed, logged = [], {}
    monkeypatch.setattr(module, "surrogate_loss", lambda z, grad, reduction="hw": (z * 0).sum())

    def unit_identity(z_tgt, z_src, grad, reduction="hw", weight=None):
        steps_computed.append(m.global_step)
        return (z_tgt * 0).sum() + 1.0

    monkeypatch.setattr(module, "identity_loss", unit_identity)
    monkeypatch.setattr(m, "log", lambda name, value, **kw: logged.setdefault(name, []).append(float(value)))
    make_trainer(tmp_path, steps=4).fit(m, datamodule=dm())
    assert steps_computed == [0, 2, 3]
    assert logged["train/loss_dds"] == [0.5, 0.0, 2.0, 2.0]  # the surrogate is 0 here: the loss is the term's weight
    for bad in ([[2, 1.0], [1, 1.0]], [[0, -1.0]], [[-1, 1.0]], "often"):
        with pytest.raises(ValueError, match="identity_weight_phases"):
            make_module(tiny_teacher, loss={"identity_weight": 0.5, "identity_weight_phases": bad})
    with pytest.raises(ValueError, match="identity_weight"):
        make_module(tiny_teacher, loss={"identity_weight": -0.1})


def test_anchor_term_holds_its_tasks_to_the_generator_of_its_first_step(tiny_teacher, tmp_path, monkeypatch):
    """loss.anchor_weight_phases / anchor_tasks: from the first phase's step on, the identity term's loss toward a
    frozen copy of the generator (its EMA weights at that step) instead of the sources, for those tasks only; the
    copy stays out of the module's weights, is saved with a checkpoint and comes back from it."""
    import ddstrans.anchor as anchor_module

    calls, identity_loss = [], anchor_module.identity_loss

    def spy(z_tgt, z_ref, grad, reduction="hw", weight=None):
        calls.append((m.global_step, z_ref.clone(), None if weight is None else weight.clone()))
        return identity_loss(z_tgt, z_ref, grad, reduction, weight)

    monkeypatch.setattr(anchor_module, "identity_loss", spy)
    m = make_module(tiny_teacher, loss={"anchor_weight_phases": [[2, 1.0]], "anchor_tasks": ["cat2dog"]})
    ids = record_task_ids(m, monkeypatch)
    at_start: dict[int, dict] = {}

    class EMAAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            at_start[trainer.global_step] = pl_module.ema_state_dict()

    make_trainer(tmp_path, steps=4, callbacks=[EMAAtStep()]).fit(m, datamodule=dm())
    assert [c[0] for c in calls] == [2, 3]                       # the identity term is off: only the anchor's
    for (_, _, flags), task_ids in zip(calls, ids[2:]):
        assert flags.tolist() == [i == 1 for i in task_ids.tolist()]
    anchor = m.anchor_generator()
    for k, v in anchor.state_dict().items():                     # the EMA weights when the term began
        torch.testing.assert_close(v, at_start[2][k])
    assert any(not torch.equal(v, m.generator.state_dict()[k]) for k, v in anchor.state_dict().items())
    assert not any(p.requires_grad for p in anchor.parameters())
    assert not any("anchor" in k for k in m.state_dict())
    with torch.no_grad():                                        # what the term held the outputs to
        z = torch.randn(2, *calls[-1][1].shape[1:])
        assert not torch.equal(anchor(z, task_ids=torch.tensor([0, 1])), z)

    trainer = make_trainer(tmp_path / "ck", steps=1)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ck = torch.load(tmp_path / "a.ckpt", weights_only=False)
    m2 = make_module(tiny_teacher, loss={"anchor_weight_phases": [[2, 1.0]]})
    m2.load_state_dict(ck["state_dict"])
    m2.on_load_checkpoint(ck)
    resaved: dict = {}                                           # saved again before its term ran (a weight-0 phase)
    m2.on_save_checkpoint(resaved)
    for k, v in resaved[anchor_module.ANCHOR_CHECKPOINT_KEY].items():
        torch.testing.assert_close(v, anchor.state_dict()[k])
    for k, v in m2.anchor_generator().state_dict().items():     # the saved anchor, not the loaded EMA
        torch.testing.assert_close(v, anchor.state_dict()[k])
    assert [m.current_anchor_weight(s) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    for bad in ([[2, 1.0], [1, 1.0]], [[0, -1.0]], "often"):
        with pytest.raises(ValueError, match="anchor_weight_phases"):
            make_module(tiny_teacher, loss={"anchor_weight_phases": bad})


def test_low_t_guidance_reaches_the_score(tiny_teacher):
    """loss.guidance_low_t / guidance_low: below the threshold the score uses guidance_low (here every t)."""
    z = torch.randn(2, 4, 8, 8)
    emb_src, emb_tgt = tiny_teacher.encode_prompts(["a cat"] * 2), tiny_teacher.encode_prompts(["a lion"] * 2)
    t, noise = torch.tensor([100, 400]), torch.randn(2, 4, 8, 8)
    low = make_module(tiny_teacher, loss={"guidance_low_t": 1000, "guidance_low": 2.0})
    plain = make_module(tiny_teacher, loss={})
    g_low = low.guidance.grad(tiny_teacher, z, z + 0.5, emb_src, emb_tgt, t=t, noise=noise)
    g_two = plain.guidance.grad(tiny_teacher, z, z + 0.5, emb_src, emb_tgt, t=t, noise=noise, guidance=2.0)
    g_full = plain.guidance.grad(tiny_teacher, z, z + 0.5, emb_src, emb_tgt, t=t, noise=noise)
    torch.testing.assert_close(g_low, g_two)
    assert not torch.allclose(g_low, g_full)
    with pytest.raises(ValueError, match="guidance_low_t"):
        make_module(tiny_teacher, loss={"guidance_low_t": -5})
    # guidance_low_from_step: the target guidance before that step, guidance_low from it on
    later = make_module(tiny_teacher, loss={"guidance_low_t": 1000, "guidance_low": 2.0, "guidance_low_from_step": 10})
    at = lambda step: later.guidance.grad(tiny_teacher, z, z + 0.5, emb_src, emb_tgt, step, t=t, noise=noise)  # noqa: E731
    torch.testing.assert_close(at(9), g_full)
    torch.testing.assert_close(at(10), g_two)
    # low_eligible (the flags of guidance_low_tasks): guidance_low for the flagged sample, the full scale for the other
    g_mixed = low.guidance.grad(tiny_teacher, z, z + 0.5, emb_src, emb_tgt, t=t, noise=noise,
                                low_eligible=torch.tensor([True, False]))
    torch.testing.assert_close(g_mixed[0], g_two[0])
    torch.testing.assert_close(g_mixed[1], g_full[1])
    with pytest.raises(ValueError, match="guidance_low_from_step"):
        make_module(tiny_teacher, loss={"guidance_low_from_step": -1})
