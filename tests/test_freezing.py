"""Training only some generator weights from a step on (ddstrans.freezing.TrainablePhases): the frozen weights
and their optimizer state stay exactly as they were (weight decay included), the others learn, a ``null`` phase
trains every weight again, and bad phases fail with the parameter's name."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddstrans.freezing import TrainablePhases, parse_trainable_phases, trainable_names


class _TwoLayers(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.generator = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        self.after: list[dict[str, torch.Tensor]] = []  # the weights after each optimizer step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.generator(x).squeeze(-1) - y) ** 2).mean()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after.append({n: p.detach().clone() for n, p in self.generator.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.generator.parameters(), lr=0.1, weight_decay=0.5)


def _fit(phases, steps=6):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3), torch.randn(8))
    m = _TwoLayers()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[TrainablePhases(phases)])
    trainer.fit(m, DataLoader(data, batch_size=2))
    return m


def test_only_the_matching_weights_move_in_a_phase_and_all_again_after_it():
    m = _fit([[2, r"^1\."], [4, None]])
    moved = lambda a, b, prefix: any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))  # noqa: E731
    a = m.after
    assert moved(a[0], a[1], "0.") and moved(a[0], a[1], "1.")          # steps 0-1: every weight
    for s in (2, 3):                                                    # steps 2-3: only layer 1
        assert moved(a[s - 1], a[s], "1.") and not moved(a[s - 1], a[s], "0.")
    assert moved(a[3], a[4], "0.") and moved(a[3], a[4], "1.")          # from step 4: every weight again


def test_patterns_and_bad_phases():
    names = ["unet.up_blocks.2.conv.weight", "unet.up_blocks.1.conv.weight", "unet.conv_out.bias"]
    (_, pat), = parse_trainable_phases([[10, r"up_blocks\.2|conv_out"]])
    assert trainable_names(names, pat) == [names[0], names[2]]
    assert trainable_names(names, None) == names
    for bad in ([], [[5, "x"], [5, "y"]], [[-1, "x"]], [[1, "("]], [3], "x"):
        with pytest.raises(ValueError, match="phases"):
            TrainablePhases(bad)


def test_a_pattern_matching_no_weight_fails_at_setup():
    with pytest.raises(ValueError, match="matches none"):
        _fit([[1, "no_such_layer"]], steps=2)


def test_the_documented_override_composes_into_the_callback(tmp_path):
    import hydra

    from ddstrans.cli.train import compose

    cfg = compose(["experiment=smoke", "+callbacks.trainable._target_=ddstrans.freezing.TrainablePhases",
                   '+callbacks.trainable.phases=[[4000,"up_blocks.2.|conv_out"],[4400,null]]'], tmp_path)
    cb = hydra.utils.instantiate(cfg.callbacks.trainable)
    assert [(s, p and p.pattern) for s, p in cb.phases] == [(4000, "up_blocks.2.|conv_out"), (4400, None)]
