"""``DDSTranslationModule``: trains a ``TranslationUNet`` with Delta Denoising Score against a frozen teacher.

One training step: source images (or cached latents) -> teacher VAE encode -> per-sample task ids (sampled here,
seeded per rank) -> generator -> ``dds_grad`` with the task's source prompt as the reference branch (or
``sds_grad``) -> surrogate loss -> backward through the generator only.

The teacher is a plain attribute (``ddstrans.Teacher`` is not an ``nn.Module``), so it is not in the
``state_dict``, not in checkpoints and not wrapped by DDP; each process moves its own replica to its device in
``on_fit_start`` (half precision on GPU). Only ``generator.*`` tensors are in the ``state_dict``; the EMA weights
and the task table travel in the checkpoint through ``on_save_checkpoint``.

The EMA (``ddstrans.ema``), the non-finite bookkeeping (``ddstrans.nonfinite``) and the checkpoint payload
(``ddstrans.run_checkpoint``) are mixins of their own modules; their public names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ddstrans.anchor import AnchorMixin
from ddstrans.ema import DEFAULT_EMA, EMAMixin
from ddstrans.generator import TranslationUNet
from ddstrans.guidance import Guidance
from ddstrans.nonfinite import NonFiniteGuard, NonFiniteLossError
from ddstrans.run_checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointMixin
from ddstrans.schedules import phase_steps_increase, phase_value, weight_at
from ddstrans.scores import identity_loss, palette_loss, surrogate_loss
from ddstrans.tasks import TaskTable

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "DEFAULT_EMA", "DEFAULT_VALIDATION", "LOSS_TERMS",
           "DDSTranslationModule", "NonFiniteLossError", "log_grid", "loss_defaults"]

# The loss terms beside the score; the score's settings (guidance, warm-up, t range, weighting, noise policy) are
# the fields of ``ddstrans.guidance.Guidance``. A run's ``loss`` config holds both (``loss_defaults``).
LOSS_TERMS = {
    "reduction": "hw",  # surrogate loss (z * grad).sum() / (H*W), as the reference
    "weight": 1.0,
    "max_consecutive_nonfinite": 20,  # this many non-finite (skipped) steps in a row stop the run; 0: never
    "identity_weight": 0.0,  # > 0: add scores.identity_loss (hold regions the edit does not call for)
    "identity_tasks": None,  # task names it applies to (None: every task) ...
    "identity_tasks_start": 0,  # ... from this step on; before it, every task
    "identity_weight_phases": None,  # [[from_step, weight], ...]: from each step on, that weight (identity_weight before)
    "anchor_weight_phases": None,  # [[from_step, weight], ...]: hold outputs to the generator's own at the first step
    "anchor_tasks": None,  # task names the anchor term applies to (None: every task)
    "palette_weight": 0.0,  # > 0: add scores.palette_loss (keep each image's value distribution per channel)
    "palette_tasks": None,  # task names it applies to (None: every task)
    "palette_start": 0,  # step at which it joins ...
    "palette_ramp_steps": 0,  # ... and is raised to palette_weight over this many steps
}


def loss_defaults() -> dict:
    """Every key of a run's ``loss`` config with its default: ``Guidance``'s fields and ``LOSS_TERMS``."""
    return {**Guidance().to_dict(), **LOSS_TERMS}


def _weight_phases(value, name: str) -> tuple[tuple[int, float], ...]:
    """``[[from_step, weight], ...]`` (a config's spelling) as tuples; ValueError naming ``loss.<name>`` unless the
    steps increase from >= 0 and the weights are >= 0."""
    if value is None:
        return ()
    try:
        phases = tuple((int(step), float(weight)) for step, weight in value)
    except (TypeError, ValueError):
        raise ValueError(f"loss.{name} must be [[from_step, weight], ...], got {value!r}") from None
    if not phase_steps_increase(phases) or any(w < 0 for _, w in phases):
        raise ValueError(f"loss.{name} must start at increasing steps >= 0 with weights >= 0, got {value!r}")
    return phases


DEFAULT_VALIDATION = {"num_images": 4, "save_png": True, "log_images": True, "seed": 1234}


def _resolve_dtype(name: str | torch.dtype | None, device: torch.device, precision: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if "bf16" in str(precision) else torch.float16
    return getattr(torch, str(name))


class DDSTranslationModule(AnchorMixin, EMAMixin, NonFiniteGuard, CheckpointMixin, L.LightningModule):
    """Args:
    teacher: a loaded ``ddstrans.Teacher`` (kept outside ``state_dict``).
    tasks: a ``TaskTable`` or a list of ``{name, source, target}`` (encoded with the teacher).
    generator: a ``TranslationUNet`` or a factory ``f(teacher=, num_tasks=) -> TranslationUNet``
        (Hydra ``_partial_: true`` of ``ddstrans.generator.build_generator``).
    loss: the score's settings (the fields of ``ddstrans.guidance.Guidance``) and the loss terms of
        ``LOSS_TERMS``; missing keys take their defaults (``loss_defaults()``).
    optimizer: factory ``f(params) -> Optimizer`` (Hydra ``_partial_``); scheduler: ``f(optimizer=) -> LRScheduler``.
    ema: see ``DEFAULT_EMA`` (``diffusers.training_utils.EMAModel``).
    validation: see ``DEFAULT_VALIDATION``.
    teacher_dtype: ``auto`` (float32 on CPU; bf16 with bf16 precision, else fp16 on GPU) or a torch dtype name.
    run_config: the resolved run config (a plain dict), stored in checkpoints for the export's model card.
    """

    def __init__(
        self,
        teacher,
        tasks: TaskTable | list,
        generator: TranslationUNet | Callable[..., TranslationUNet],
        loss: Mapping | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "step",
        ema: Mapping | None = None,
        validation: Mapping | None = None,
        teacher_dtype: str | torch.dtype | None = "auto",
        seed: int = 0,
        run_config: Mapping | None = None,
    ):
        super().__init__()
        self.teacher = teacher  # plain attribute: not an nn.Module, so never in state_dict / DDP / checkpoints
        self.task_table = tasks if isinstance(tasks, TaskTable) else TaskTable.build(tasks, teacher)
        if not isinstance(generator, torch.nn.Module):
            generator = generator(teacher=teacher, num_tasks=len(self.task_table))
        self.generator = generator
        if hasattr(generator, "init_from_tasks_"):  # the LoRA generator: task tokens start as target prompts
            generator.init_from_tasks_(self.task_table)
        if getattr(generator, "frozen_parameter_names", None):  # shared teacher weights: DDP neither syncs nor
            self._ddp_params_and_buffers_to_ignore = [f"generator.{n}" for n in generator.frozen_parameter_names]
        loss = dict(loss or {})
        unknown = sorted(set(loss) - set(loss_defaults()))
        if unknown:
            raise ValueError(f"unknown loss settings {unknown}; known: {sorted(loss_defaults())}")
        try:
            self.guidance = Guidance.from_mapping(loss)
        except ValueError as e:
            raise ValueError(f"loss.{e}") from None
        self.loss_cfg = {**self.guidance.to_dict(), **LOSS_TERMS,
                         **{k: v for k, v in loss.items() if k in LOSS_TERMS}}
        if int(self.loss_cfg["identity_tasks_start"]) < 0:
            raise ValueError(f"loss.identity_tasks_start must be >= 0, got {self.loss_cfg['identity_tasks_start']}")
        self._identity_phases = _weight_phases(self.loss_cfg["identity_weight_phases"], "identity_weight_phases")
        if float(self.loss_cfg["identity_weight"]) < 0:
            raise ValueError(f"loss.identity_weight must be >= 0, got {self.loss_cfg['identity_weight']}")
        if float(self.loss_cfg["palette_weight"]) < 0 or int(self.loss_cfg["palette_start"]) < 0:
            raise ValueError(f"loss.palette_weight and loss.palette_start must be >= 0, got "
                             f"{self.loss_cfg['palette_weight']} and {self.loss_cfg['palette_start']}")
        if self.guidance.t_range_end is not None and self.guidance.t_range_steps <= 0:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"loss.t_range_end={list(self.guidance.t_range_end)} is ignored: loss.t_range_steps is "
                           f"{self.guidance.t_range_steps}; set loss.t_range_steps > 0")
        # per task: uses the shared noise / guidance_low / the identity term / the palette term (None: every task)
        self._shared_task_mask = self._task_mask(self.loss_cfg["shared_noise_tasks"])
        self._guidance_low_task_mask = self._task_mask(self.loss_cfg["guidance_low_tasks"])
        self._identity_task_mask = self._task_mask(self.loss_cfg["identity_tasks"])
        self._palette_task_mask = self._task_mask(self.loss_cfg["palette_tasks"])
        self._init_anchor(_weight_phases(self.loss_cfg["anchor_weight_phases"], "anchor_weight_phases"),
                          self._task_mask(self.loss_cfg["anchor_tasks"]))
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.ema_cfg = {**DEFAULT_EMA, **dict(ema or {})}
        self.val_cfg = {**DEFAULT_VALIDATION, **dict(validation or {})}
        self.teacher_dtype_name = teacher_dtype
        self.seed = int(seed)
        self.run_config = dict(run_config or {})
        self.ema = self._new_ema()
        self._ema_from_checkpoint = False
        self._rng: torch.Generator | None = None
        self._init_nonfinite()
        self._stepped = False
        self._ema_swapped = False
        self._val_grid_rows: list = []

    def _task_mask(self, names) -> torch.Tensor | None:
        """A boolean per task of the table, True for ``names`` (None for None: every task); KeyError naming the
        known tasks for a typo."""
        if names is None:
            return None
        mask = torch.zeros(len(self.task_table), dtype=torch.bool)
        mask[[self.task_table.index(n) for n in ([names] if isinstance(names, str) else names)]] = True
        return mask

    def _task_flags(self, attr: str, task_ids: torch.Tensor) -> torch.Tensor | None:
        """Per sample, the flag of its task in the task mask ``attr`` (moved once to the ids' device: no copy per
        step)."""
        mask = getattr(self, attr)
        if mask is None:
            return None
        if mask.device != task_ids.device:
            mask = mask.to(task_ids.device)
            setattr(self, attr, mask)
        return mask[task_ids]

    def _identity_flags(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """Per-sample flags of ``loss.identity_tasks`` from ``loss.identity_tasks_start`` on; None (every task, the
        unweighted sum) before it, so a run's first steps are those of the same run without the restriction."""
        if self.global_step < int(self.loss_cfg["identity_tasks_start"]):
            return None
        return self._task_flags("_identity_task_mask", task_ids)

    def current_identity_weight(self, step: int | None = None) -> float:
        """Weight of the identity term at ``step`` (default: now): ``loss.identity_weight``, or from each step of
        ``loss.identity_weight_phases`` on, that phase's weight."""
        step = self.global_step if step is None else step
        return float(phase_value(step, float(self.loss_cfg["identity_weight"]), self._identity_phases))

    def current_palette_weight(self, step: int | None = None) -> float:
        """Weight of the palette term at ``step`` (default: now): 0 before ``loss.palette_start``, then ramped."""
        c = self.loss_cfg
        step = self.global_step if step is None else step
        return weight_at(step, float(c["palette_weight"]), int(c["palette_start"]), int(c["palette_ramp_steps"]))

    # ------------------------------------------------------------------ devices
    def _place_teacher(self) -> None:
        """Move this process's teacher replica (and the task embeddings, EMA) to the module's device."""
        device = self.device
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        dtype = _resolve_dtype(self.teacher_dtype_name, device, precision)
        if self.teacher.device != device or self.teacher.dtype != dtype:
            self.teacher.to(device, dtype)
            if hasattr(self.generator, "keep_trainable_fp32_"):  # it shares the teacher's (now cast) UNet
                self.generator.keep_trainable_fp32_()
        if self.task_table.source.device != device:
            self.task_table.to(device)
        self._ema_to_device()

    def on_fit_start(self) -> None:
        # Under DDP the weights were just broadcast from rank 0 (ranks may have built different random inits):
        # start the EMA from them unless a checkpoint restored it.
        if self.ema is not None and not self._ema_from_checkpoint and self.global_step == 0:
            self.ema = self._new_ema()
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    def _generator_rng(self, batch_idx: int = 0) -> torch.Generator:
        """Per-rank task/timestep/noise RNG of one training batch, seeded from (seed, rank, global step, batch
        index): a function of the position in training alone, so a resumed run draws exactly what the
        uninterrupted run drew at that step (no RNG state to checkpoint; accumulated micro-batches differ by
        their batch index)."""
        rank = self.global_rank if self._trainer is not None else 0
        if self._rng is None:
            self._rng = torch.Generator()
        import numpy as np

        key = [abs(int(x)) for x in (self.seed, rank, self.global_step, batch_idx)]
        return self._rng.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Mapping) -> torch.Tensor:
        if "latents" in batch and batch["latents"] is not None:
            return batch["latents"].to(self.device, torch.float32)
        return self.teacher.encode_images(batch["pixels"].to(self.device)).float()

    def _translate(self, z_src: torch.Tensor, task_index: int, captions=None):
        ids = torch.full((z_src.shape[0],), task_index, dtype=torch.long, device=self.device)
        emb_src, emb_tgt = self.task_table.embeddings_for(ids, captions, self.teacher)
        return self.generator(z_src, task_ids=ids, src_emb=emb_src, tgt_emb=emb_tgt).float(), emb_src, emb_tgt

    @torch.no_grad()
    def translate_pixels(self, pixels: torch.Tensor, task_index: int, captions=None) -> torch.Tensor:
        """Images in [-1, 1] through the current generator (the EMA weights during validation) for one task."""
        z = self.teacher.encode_images(pixels.to(self.device)).float()
        return self.teacher.decode_latents(self._translate(z, task_index, captions)[0]).float()

    def current_guidance(self, step: int | None = None) -> float:
        """The guidance scale at ``step`` (default: now), after the warm-up ramp."""
        return self.guidance.scale_at(self.global_step if step is None else step)

    def current_t_range(self, step: int | None = None) -> tuple[int, int]:
        """The timestep range at ``step`` (default: now), after the anneal."""
        return self.guidance.t_range_at(self.global_step if step is None else step)

    def training_noise(self, z: torch.Tensor, task_ids: torch.Tensor, rng: torch.Generator) -> torch.Tensor | None:
        """The noise of this step's score under ``loss.shared_noise_*`` (``Guidance.noise``): the shared noise is
        seeded by ``loss.shared_noise_seed`` alone, so equal on every rank and after a resume."""
        return self.guidance.noise(z, rng, self._task_flags("_shared_task_mask", task_ids))

    def score(self, z_src, z_tgt, emb_src, emb_tgt, **kw):
        """``(grad, info)`` of the run's score (``Guidance.grad``) at the current step; ``kw`` as it takes."""
        return self.guidance.grad(self.teacher, z_src, z_tgt, emb_src, emb_tgt, self.global_step, return_info=True,
                                  **kw)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        self._place_teacher()
        rng = self._generator_rng(batch_idx)
        z_src = self.encode(batch)
        b = z_src.shape[0]
        task_ids = torch.randint(len(self.task_table), (b,), generator=rng).to(self.device)
        emb_src, emb_tgt = self.task_table.embeddings_for(task_ids, batch.get("caption"), self.teacher, rng)
        z_tgt = self.generator(z_src, task_ids=task_ids, src_emb=emb_src, tgt_emb=emb_tgt)
        guidance = self.current_guidance()
        noise = self.training_noise(z_src, task_ids, rng)
        grad, info = self.score(z_src, z_tgt.detach().float(), emb_src, emb_tgt, generator=rng, noise=noise,
                                low_eligible=self._task_flags("_guidance_low_task_mask", task_ids))
        self.step_timesteps = info.t  # per sample, for callbacks that act on the backward (freezing.LowNoiseRouting)
        loss = surrogate_loss(z_tgt.float(), grad, self.loss_cfg["reduction"]) * self.loss_cfg["weight"]
        identity_w = self.current_identity_weight()
        if identity_w:
            ident = identity_loss(z_tgt.float(), z_src, grad, self.loss_cfg["reduction"],
                                  self._identity_flags(task_ids))
            self.log("train/loss_identity", ident.detach())
            loss = loss + identity_w * ident
        anchor_w = self.current_anchor_weight()
        if anchor_w:
            anchor = self.anchor_term(z_tgt.float(), z_src, grad, task_ids, emb_src, emb_tgt,
                                      self.loss_cfg["reduction"], self._task_flags("_anchor_task_mask", task_ids))
            self.log("train/loss_anchor", anchor.detach())
            loss = loss + anchor_w * anchor
        palette_w = self.current_palette_weight()
        if palette_w:
            palette = palette_loss(z_tgt.float(), z_src, self._task_flags("_palette_task_mask", task_ids))
            self.log("train/loss_palette", palette.detach())
            loss = loss + palette_w * palette

        self._record_step_health(loss, info, z_tgt, batch)
        name = f"train/loss_{self.guidance.method}"
        self.log(name, torch.nan_to_num(loss.detach()), prog_bar=True)
        self.log("train/guidance", float(guidance))
        self.log("train/nonfinite", info.nonfinite.float())
        self.log("train/skipped_steps", float(self.skipped_steps))
        self.log("train/consecutive_skipped", float(self.consecutive_skipped))
        self.log("train/skipped_samples", float(self.skipped_samples))
        self.log("train/delta", (z_tgt.detach() - z_src).abs().mean())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach().float() for p in self.generator.parameters() if p.grad is not None]
        if grads:  # one foreach kernel for every tensor's norm, not a Python loop of them
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if self._skip_step:
            # Grad None => torch optimizers leave the parameter and its state (moments, step) untouched.
            for p in self.generator.parameters():
                p.grad = None
        self._stepped = not self._skip_step

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the optimizer step: before callbacks' on_train_batch_end (ModelCheckpoint), so a
        # checkpoint written at this step holds this step's EMA and resume continues it exactly.
        if self._stepped:
            self._ema_step()
        self._stepped = False
        self._end_optimizer_window()

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=[p for p in self.generator.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval}}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.swap_in_ema()
        self._val_grid_rows = []

    def validation_step(self, batch, batch_idx):
        z_src = self.encode(batch)
        b = z_src.shape[0]
        g = torch.Generator().manual_seed(int(self.val_cfg["seed"]) + batch_idx)
        noise = torch.randn(z_src.shape, generator=g).to(self.device)
        t = torch.full((b,), sum(self.current_t_range(10**9)) // 2, dtype=torch.long, device=self.device)
        norms, deltas, outs = [], [], []
        for k in range(len(self.task_table)):
            z_tgt, emb_src, emb_tgt = self._translate(z_src, k, batch.get("caption"))
            grad, info = self.score(z_src, z_tgt, emb_src, emb_tgt, t=t, noise=noise, guidance=self.guidance.guidance)
            norm = grad.pow(2).mean()
            # zeroed non-finite score entries would read as a perfect 0: a diverged generator reports NaN
            finite = (info.nonfinite == 0) & torch.isfinite(z_tgt).all()
            norms.append(torch.where(finite, norm, torch.full_like(norm, float("nan"))))
            deltas.append((z_tgt - z_src).abs().mean())
            outs.append(z_tgt)
        self.log("val/dds_norm", torch.stack(norms).mean(), sync_dist=True, batch_size=b)
        self.log("val/delta", torch.stack(deltas).mean(), sync_dist=True, batch_size=b)
        if self.global_rank == 0 and self.val_cfg["num_images"] > 0:
            have = sum(len(r) for r in self._val_grid_rows)
            take = max(0, int(self.val_cfg["num_images"]) - have)
            if take:
                src = self.teacher.decode_latents(z_src[:take])
                trans = [self.teacher.decode_latents(o[:take]) for o in outs]
                self._val_grid_rows.append([src, *trans])

    def on_validation_epoch_end(self) -> None:
        self.swap_out_ema()
        if not self.trainer.sanity_checking:
            self._check_validation_finite()
        if self.global_rank == 0 and self._val_grid_rows and not self.trainer.sanity_checking:
            self._write_grid()
        self._val_grid_rows = []

    @rank_zero_only
    def _write_grid(self) -> None:
        from ddstrans.images import image_grid, tensor_to_pil

        cols = [torch.cat(parts) for parts in zip(*self._val_grid_rows)]  # [src, task1, task2, ...]
        columns = [tensor_to_pil(c) for c in cols]
        rows = [list(r) for r in zip(*columns)]
        grid = image_grid(rows)
        caption = "source | " + " | ".join(self.task_table.names)
        step = self.global_step
        if self.val_cfg["save_png"]:
            out = Path(self.trainer.default_root_dir) / "val"
            out.mkdir(parents=True, exist_ok=True)
            grid.save(out / f"step_{step:07d}.png")
        if self.val_cfg["log_images"]:
            log_grid(self.loggers, grid, step, caption)

def log_grid(loggers, grid, step: int, caption: str = "", key: str = "val/grid") -> None:
    """Log a PIL image to whatever loggers are attached (wandb, tensorboard; CSV has no images)."""
    import numpy as np

    for lg in loggers:
        name = type(lg).__name__
        try:
            if name == "WandbLogger":
                lg.log_image(key=key, images=[grid], step=step, caption=[caption])
            elif name == "TensorBoardLogger":
                lg.experiment.add_image(key, np.asarray(grid), step, dataformats="HWC")
        except Exception as e:  # noqa: BLE001 - a logger failing must not kill training
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"could not log the validation grid to {name}: {e}")
