"""Gradient accumulation changed at a step (ddstrans.accumulation) and step decays on a diffusers schedule
(ddstrans.lr_schedules): each optimizer step applies the mean gradient of exactly its own batches, a resumed run
switches where the uninterrupted one did, and a non-finite batch anywhere in a window skips the whole step."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddstrans.accumulation import StepGradAccumulation, accumulation_at, may_switch
from ddstrans.lr_schedules import with_step_decay


def test_factor_and_switch_rules():
    sched = {3: 2, 10: 4}
    assert [accumulation_at(s, sched) for s in (0, 2, 3, 9, 10, 99)] == [1, 1, 2, 2, 4, 4]
    assert accumulation_at(0, sched, base=5) == 5
    assert may_switch(4, 1, 2) and not may_switch(3, 1, 2) and not may_switch(2, 4, 2) and may_switch(8, 4, 2)


@pytest.mark.parametrize("bad", [{}, {-1: 2}, {3: 0}, {"x": 2}, [3]])
def test_bad_scheduling_names_the_parameter(bad):
    with pytest.raises(ValueError, match="scheduling"):
        StepGradAccumulation(bad)


class _Linear(L.LightningModule):
    """y = w.x under plain SGD (lr 1): an optimizer step moves w by exactly minus the gradient it applied."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.applied: list[tuple[int, torch.Tensor]] = []  # (global step, w after the step)
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (global step at the batch, x, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append((self.global_step, x.clone(), y.clone()))
        return ((x @ self.w - y) ** 2).mean()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.applied.append((self.global_step, self.w.detach().clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _fit(scheduling, steps, n=12, batch=2):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, generator=g) * 0.1, torch.randn(n, generator=g) * 0.1)
    m = _Linear()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StepGradAccumulation(scheduling)])
    trainer.fit(m, DataLoader(data, batch_size=batch, shuffle=False))
    return m


def _window_sizes(m):
    sizes = []
    for step, *_ in m.batches:
        if len(sizes) <= step:
            sizes.append(0)
        sizes[step] += 1
    return sizes


@pytest.mark.parametrize("scheduling, n, sizes", [
    ({2: 2}, 12, [1, 1, 2, 2, 2, 2]),      # aligned: batch 2 starts the first window of 2
    ({1: 2}, 12, [1, 1, 2, 2, 2, 2]),      # step 1 is batch 1, not a multiple of 2: one more single batch first
    ({1: 2, 3: 3}, 24, [1, 1, 2, 2, 3, 3]),  # 3 from batch 6, the first multiple of 2 and 3 after step 3's batch 4
    ({1: 2, 4: 3}, 12, [1, 1, 2, 2, 3, 3]),  # 3 from batch 0 of the 2nd epoch (6 batches per epoch)
])
def test_each_step_applies_the_mean_gradient_of_exactly_its_batches(scheduling, n, sizes):
    m = _fit(scheduling, steps=len(sizes), n=n)
    assert _window_sizes(m) == sizes
    w = torch.zeros(3)
    for step, (_, after) in enumerate(m.applied):
        window = [(x, y) for s, x, y in m.batches if s == step]
        grad = torch.stack([(2 * (x @ w - y)[:, None] * x).mean(0) for x, y in window]).mean(0)
        w = w - grad  # no gradient of an earlier window is left in: Lightning zeroed it at the window's start
        torch.testing.assert_close(after, w)


def test_resumed_run_switches_where_the_uninterrupted_one_did(tmp_path):
    import csv

    from ddstrans.cli.train import compose, train

    quiet = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
    # 4 batches per epoch; from step 3 two per step: steps 3 (batch 3 alone: not a multiple of 2), 4 (batches 0+1
    # of the 2nd epoch), ...; the cut at step 5 resumes at batch 2 of the 2nd epoch
    base = ["experiment=smoke", *quiet, "data.num_train=8", "trainer.val_check_interval=100",
            "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.max_steps=9",
            "+callbacks.accumulate._target_=ddstrans.accumulation.StepGradAccumulation",
            "+callbacks.accumulate.scheduling={3: 2}"]
    train(compose(base, tmp_path / "full"))
    train(compose([*base, "trainer.max_steps=5"], tmp_path / "cut"))
    train(compose([*base, "ckpt_path=last"], tmp_path / "cut"))

    def losses(run):
        rows = [r for f in sorted(run.glob("csv/*/metrics.csv")) for r in csv.DictReader(open(f))
                if r.get("train/loss_dds")]
        return [(int(r["step"]), float(r["train/loss_dds"])) for r in rows]

    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    # one row per optimizer step (Lightning logs at the window's last batch), its batch's loss: a resume that
    # grouped other batches would log other losses
    assert [s for s, _ in full] == [s for s, _ in cut] == list(range(9))
    torch.testing.assert_close(torch.tensor([v for _, v in cut[5:]]), torch.tensor([v for _, v in full[5:]]),
                               rtol=1e-5, atol=1e-8)


def test_step_decay_multiplies_the_diffusers_schedule_and_survives_a_checkpoint():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = with_step_decay(opt, name="constant_with_warmup", num_warmup_steps=4, milestones=[6, 8], gamma=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # nothing of the closure is pickled
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    again = with_step_decay(opt2, name="constant_with_warmup", num_warmup_steps=4, milestones=[6, 8], gamma=0.5)
    again.load_state_dict(state)
    again.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("kw, match", [({"milestones": [0]}, "milestones"), ({"gamma": 0.0}, "gamma"),
                                       ({"name": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau")])
def test_bad_step_decay_names_the_parameter(kw, match):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=match):
        with_step_decay(opt, **{"name": "constant", **kw})
