"""Training only some generator weights from a step on (ddstrans.freezing.TrainablePhases): the frozen weights
and their optimizer state stay exactly as they were (weight decay included), the others learn, a ``null`` phase
trains every weight again, and bad phases fail with the parameter's name."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddstrans.freezing import LowNoiseRouting, TrainablePhases, parse_trainable_phases, trainable_names


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


# ---------------------------------------------------------------- LowNoiseRouting: per-sample routing of gradients
def _routed_last_block_grads(keep):
    """Gradients of a tiny TranslationUNet's parameters with the samples flagged False in ``keep`` routed to its
    last up block (and the layers after it); ``keep=None``: no routing."""
    from ddstrans.generator import TranslationUNet
    from tests.test_generator import TINY

    torch.manual_seed(0)
    g = TranslationUNet(conditioning="task_id", num_tasks=3, **TINY)
    for p in g.parameters():  # the zero-initialised output layer would stop every gradient
        p.data.normal_(0, 0.1)
    router = LowNoiseRouting(below_t=50, module="unet.up_blocks.1")
    router.setup(None, SimpleNamespace(generator=g), "fit")
    z, ids = torch.randn(2, 4, 16, 16), torch.tensor([0, 1])

    def grads(z, ids, keep):
        g.zero_grad()
        out = g(z, task_ids=ids)
        router.keep = keep  # set after the forward, as the trainer does once the timesteps are drawn
        out.pow(2).sum().backward()
        router.keep = None
        return {n: p.grad.clone() for n, p in g.named_parameters()}

    return grads(z, ids, None), grads(z, ids, torch.tensor([False, True])), grads(z[1:], ids[1:], None)


def test_a_routed_sample_teaches_only_the_routed_block_and_the_layers_after_it():
    both, routed, second_alone = _routed_last_block_grads(keep=torch.tensor([False, True]))
    after = ("unet.up_blocks.1.", "unet.conv_norm_out", "unet.conv_out")
    n_after = 0
    for name in both:
        if name.startswith(after):  # both samples' gradient
            n_after += 1
            torch.testing.assert_close(routed[name], both[name])
        else:  # the routed sample's gradient is cut before the block: only the other sample's remains
            torch.testing.assert_close(routed[name], second_alone[name], atol=1e-6, rtol=1e-5)
    assert 0 < n_after < len(both)
    before = [n for n in both if not n.startswith(after)]  # without routing the first sample did teach them
    assert sum((both[n] - second_alone[n]).abs().sum() for n in before) > 1e-2


class _RoutedTwoLayers(_TwoLayers):
    """Layer 1 is the routed module; each sample's "timestep" comes with the batch. Before each optimizer step it
    records layer 0's gradient, and what it would be unrouted and with the low-noise samples cut by hand."""

    def __init__(self):
        super().__init__()
        self.layer0: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._batch = None

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        self.step_timesteps = t
        self._batch = batch
        return ((self.generator(x).squeeze(-1) - y) ** 2).mean()

    def _layer0_grad(self, cut: torch.Tensor) -> torch.Tensor:
        x, y, _ = self._batch
        h = self.generator[0](x)
        h = torch.where(cut[:, None], h.detach(), h)
        loss = ((self.generator[1](h).squeeze(-1) - y) ** 2).mean()
        return torch.autograd.grad(loss, self.generator[0].weight)[0]

    def on_before_optimizer_step(self, optimizer):
        t = self._batch[2]
        self.layer0.append((self.generator[0].weight.grad.clone(), self._layer0_grad(torch.zeros_like(t).bool()),
                            self._layer0_grad(t < 50)))


def test_routing_starts_at_from_step_and_follows_each_batchs_timesteps():
    torch.manual_seed(0)
    t = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0, 900.0, 10.0, 900.0])  # batches: low+low, low+low, low+high, ...
    data = TensorDataset(torch.randn(8, 3), torch.randn(8), t)
    m = _RoutedTwoLayers()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LowNoiseRouting(below_t=50, module="1", from_step=1)])
    trainer.fit(m, DataLoader(data, batch_size=2))
    (g0, full0, _), *routed = m.layer0
    torch.testing.assert_close(g0, full0)               # step 0, before from_step: every sample teaches layer 0
    assert full0.abs().sum() > 0
    for g, _, cut in routed:                            # from step 1: only the high-noise samples do
        torch.testing.assert_close(g, cut)
    assert routed[0][0].abs().sum() == 0                # step 1: both samples low-noise
    assert not torch.allclose(routed[1][0], routed[1][1])  # step 2: one of each, the low one's share is gone
    assert trainer.callback_metrics["train/routed_share"] == 0.5


def test_routing_fails_clearly_on_bad_settings():
    with pytest.raises(ValueError, match="below_t"):
        LowNoiseRouting(below_t=0)
    with pytest.raises(ValueError, match="from_step"):
        LowNoiseRouting(below_t=50, from_step=-1)
    with pytest.raises(ValueError, match="module: the generator has no submodule 'unet.nope'"):
        LowNoiseRouting(below_t=50, module="unet.nope").setup(None, SimpleNamespace(generator=torch.nn.Linear(2, 2)),
                                                              "fit")


def test_the_documented_routing_override_composes_into_the_callback(tmp_path):
    import hydra

    from ddstrans.cli.train import compose

    cfg = compose(["experiment=smoke", "+callbacks.route._target_=ddstrans.freezing.LowNoiseRouting",
                   "+callbacks.route.below_t=50", "+callbacks.route.from_step=4400"], tmp_path)
    cb = hydra.utils.instantiate(cfg.callbacks.route)
    assert (cb.below_t, cb.module, cb.from_step) == (50.0, "unet.up_blocks.2", 4400)
