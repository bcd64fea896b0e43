"""The component measurements (b), (c), (d) of ``bench_train_step.py`` and the Lightning callback that takes
them inside the real training loop, between two of its steps, so (a) and the components see the same machine state.
"""

from __future__ import annotations

import copy
import time

import torch

from train_step.setups import EMA, GRAD_CLIP, LR, LR_WARMUP, Memory, Setup, autocast_ctx, make_loader


# ---------------------------------------------------------------------- the b, c, d measurements
class Components:
    """(b) teacher four-way call, (c) generator fwd+bwd, (d) the plain PyTorch step; each on its own state."""

    def __init__(self, module, gen_init, setup: Setup, batch: int, n_steps: int, data_kind: str, device, dtype, sync):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.module, self.setup, self.device, self.dtype, self.sync = module, setup, device, dtype, sync
        self.teacher = setup.teacher
        self.table = module.task_table
        self.loss_cfg = module.loss_cfg
        g = torch.Generator().manual_seed(1)
        shape = (batch, *setup.latent_shape())
        self.z_src = torch.randn(shape, generator=g).to(device)
        self.z_tgt = (self.z_src + 0.1 * torch.randn(shape, generator=g).to(device))
        ids = torch.arange(batch) % len(self.table)
        self.ids = ids.to(device)
        self.emb_src, self.emb_tgt = self.table.first(self.ids)
        self.fixed_grad = torch.randn(shape, generator=g).to(device)
        self.rng_b = torch.Generator().manual_seed(2)
        # (c): its own generator copy
        self.gen_c = copy.deepcopy(gen_init).to(device).train()
        # (d): its own generator, optimizer, schedule, EMA, RNG, DataLoader
        self.gen_d = copy.deepcopy(gen_init).to(device).train()
        params = [p for p in self.gen_d.parameters() if p.requires_grad]
        self.opt_d = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
        self.sched_d = get_scheduler("constant_with_warmup", optimizer=self.opt_d, num_warmup_steps=LR_WARMUP)
        c = EMA
        self.ema_d = EMAModel(self.gen_d.parameters(), decay=c["decay"], update_after_step=c["update_after_step"],
                              use_ema_warmup=c["use_ema_warmup"], inv_gamma=c["inv_gamma"], power=c["power"])
        self.ema_d.to(device)
        self.rng_d = torch.Generator().manual_seed(3)
        self.loader_d = make_loader(setup, batch, n_steps, data_kind, seed=5)
        self.iter_d = iter(self.loader_d)
        self.step_d = 0

    def teacher_call(self):
        from ddstrans.scores import dds_grad

        tdt = self.teacher.dtype
        with autocast_ctx(self.device, self.dtype):
            return dds_grad(self.teacher, self.z_src, self.z_tgt, self.emb_src.to(tdt), self.emb_tgt.to(tdt),
                            guidance_scale=self.module.guidance.guidance, t_range=self.module.guidance.t_range,
                            generator=self.rng_b)

    def generator_fwd_bwd(self):
        from ddstrans.scores import surrogate_loss

        with torch.enable_grad(), autocast_ctx(self.device, self.dtype):
            out = self.gen_c(self.z_src, task_ids=self.ids, src_emb=self.emb_src, tgt_emb=self.emb_tgt)
        surrogate_loss(out.float(), self.fixed_grad).backward()
        for p in self.gen_c.parameters():
            p.grad = None

    def plain_step(self):
        from ddstrans.scores import surrogate_loss

        try:
            batch = next(self.iter_d)
        except StopIteration:
            self.iter_d = iter(self.loader_d)
            batch = next(self.iter_d)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        c, teacher, rng = self.loss_cfg, self.teacher, self.rng_d
        with torch.enable_grad():
            z_src = (batch["latents"].float() if "latents" in batch else teacher.encode_images(batch["pixels"]).float())
            b = z_src.shape[0]
            ids = torch.randint(len(self.table), (b,), generator=rng).to(self.device)
            emb_src, emb_tgt = self.table.sample(ids, rng)
            with autocast_ctx(self.device, self.dtype):
                z_tgt = self.gen_d(z_src, task_ids=ids, src_emb=emb_src, tgt_emb=emb_tgt)
                grad = self.module.guidance.grad(teacher, z_src, z_tgt.detach().float(), emb_src, emb_tgt, self.step_d,
                                                 generator=rng)
                loss = surrogate_loss(z_tgt.float(), grad, c["reduction"]) * c["weight"]
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.gen_d.parameters(), GRAD_CLIP)
        self.opt_d.step()
        self.sched_d.step()
        self.ema_d.step(self.gen_d.parameters())
        self.step_d += 1


def _lightning_callback_cls():
    import lightning as L

    class RoundTimer(L.Callback):
        """Times (a) per loop iteration and runs one round of b, c, d right after each training batch."""

        def __init__(self, comps_factory, warmup: int, mem: Memory, sync):
            self.comps_factory, self.comps = comps_factory, None
            self.warmup, self.mem, self.sync = warmup, mem, sync
            self.starts, self.windows, self.extras = [], [], []
            self.times = {"b": [], "c": [], "d": []}
            self.peaks = {"a": [], "b": [], "c": [], "d": []}
            self.peaks_abs = {"a": [], "b": [], "c": [], "d": []}
            self.k = 0
            self._mem0 = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.sync()
            self._mem0 = self.mem.reset()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sync()
            t_end = time.perf_counter()
            self.windows.append(t_end - self.starts[-1])
            measured = self.k >= self.warmup
            if measured:
                self.peaks["a"].append(self.mem.peak() - self._mem0)
                self.peaks_abs["a"].append(self.mem.peak())
            if self.comps is None:
                self.comps = self.comps_factory()
            order = [("b", self.comps.teacher_call), ("c", self.comps.generator_fwd_bwd), ("d", self.comps.plain_step)]
            r = self.k % 3
            for name, fn in order[r:] + order[:r]:
                m0 = self.mem.reset()
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                dt = time.perf_counter() - t0
                if measured:
                    self.times[name].append(dt)
                    self.peaks[name].append(self.mem.peak() - m0)
                    self.peaks_abs[name].append(self.mem.peak())
            self.extras.append(time.perf_counter() - t_end)
            self.k += 1

        def iteration_times(self) -> list[float]:
            """(a): next start - this start - the time spent in this script's b/c/d round."""
            return [self.starts[i + 1] - self.starts[i] - self.extras[i] for i in range(len(self.starts) - 1)]

    return RoundTimer
