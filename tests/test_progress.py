"""The training progress bar (ddstrans.progress.StepProgressBar) counts optimizer steps of max_steps: through
gradient accumulation, across the data's epochs and after a resume from a checkpoint saved mid-epoch, where
Lightning's own bar has no total."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from ddstrans.accumulation import StepGradAccumulation
from ddstrans.progress import StepProgressBar


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((x @ self.w - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _recording(base):
    """``base`` that keeps (step, n, total) of its training bar after each batch and what it showed at the end."""

    class Bar(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.history: list[tuple[int, int, int | None]] = []

        def on_train_end(self, trainer, pl_module):
            bar = self.train_progress_bar
            self.shown = {"n": bar.n, "total": bar.total, "initial": bar.initial, "desc": bar.desc}
            super().on_train_end(trainer, pl_module)

        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            bar = self.train_progress_bar
            self.history.append((trainer.global_step, bar.n, bar.total))

    return Bar


def _fit(bar_cls, steps=-1, max_epochs=None, ckpt_in=None, ckpt_dir=None, accumulate=None):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, generator=g))  # 4 batches per epoch
    bar = _recording(bar_cls)(refresh_rate=1)
    callbacks = [bar] + ([StepGradAccumulation(accumulate)] if accumulate else [])
    if ckpt_dir:  # saved during training, as the run's own checkpoints are
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = L.Trainer(max_steps=steps, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=bool(ckpt_dir), enable_model_summary=False, callbacks=callbacks)
    trainer.fit(_Linear(), DataLoader(data, batch_size=2), ckpt_path=ckpt_in)
    return bar


def test_bar_counts_steps_through_accumulation_and_epochs():
    bar = _fit(StepProgressBar, steps=7, accumulate={2: 3})  # 2 steps of 1 batch, 5 of 3: 17 batches, 5 epochs
    assert bar.shown["total"] == 7 and bar.shown["n"] == 7 and bar.shown["initial"] == 0
    assert all(n == step and total == 7 for step, n, total in bar.history)  # never ahead of the steps inside a window
    assert bar.shown["desc"].startswith("Epoch ")


def test_resumed_mid_epoch_run_keeps_its_total_and_counts_from_the_restored_step(tmp_path):
    _fit(StepProgressBar, steps=5, ckpt_dir=tmp_path)
    ckpt = str(tmp_path / "epoch=0-step=3.ckpt")  # after batch 3 of a 4-batch epoch
    bar = _fit(StepProgressBar, steps=6, ckpt_in=ckpt)
    assert bar.shown == {"n": 6, "total": 6, "initial": 3, "desc": bar.shown["desc"]}
    assert [(n, total) for _, n, total in bar.history] == [(4, 6), (5, 6), (6, 6)]
    # what the replacement is for: Lightning's bar, resumed mid-epoch, has no total until the next epoch
    plain = _fit(TQDMProgressBar, steps=6, ckpt_in=ckpt)
    assert plain.history[0][2] is None


def test_epoch_bounded_run_keeps_lightnings_per_epoch_bar():
    bar = _fit(StepProgressBar, max_epochs=2)
    assert bar.shown["total"] == 4 and bar.shown["n"] == 4  # batches of the last epoch, as Lightning counts
