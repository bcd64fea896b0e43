"""Real-image metrics at validation: ``ddstrans.metrics`` on a fixed set, logged while training runs.

``val/dds_norm`` says how far the teacher still wants to move the outputs, not whether the translation keeps the
input's structure or reaches the target prompt. At the end of each validation (with the EMA weights swapped in,
as for the grid) this callback translates a fixed set of inputs for every task and logs, per task and averaged
over tasks (the metric's mean over images; NaN only when no image has a defined value):

    val/<task>/clip_target  val/<task>/clip_direction  val/<task>/dino_structure  ...
    val/clip_target         val/clip_direction         val/dino_structure         ...

and an image grid (source | each task) to the loggers as ``val/metrics_grid``. A ``ModelCheckpoint`` may
monitor any of them (``callbacks=real_metrics``: best by ``val/clip_direction``). The fixed set is the first
``n`` images of ``images`` (a folder) or, unset, of the datamodule's validation loader. Every rank computes the
same figures (fixed inputs), so a checkpoint callback may monitor them under DDP without a collective.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ddstrans.metrics import SET_LEVEL, available_metrics, build_metrics


class ImageMetrics(Callback):
    def __init__(self, clip: str | None = None, dino: str | None = None, fid_features: str | None = None,
                 targets: str | None = None, metrics: list[str] | None = None, images: str | None = None,
                 n: int = 16, batch_size: int = 8, grid_images: int = 4):
        if n < 1 or batch_size < 1:
            raise ValueError(f"ImageMetrics needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.paths = {"clip": clip, "dino": dino, "fid_features": fid_features}
        self.targets_dir, self.images_dir = targets, images
        self.names = list(metrics) if metrics else available_metrics(clip=clip, dino=dino, fid_features=fid_features,
                                                                      targets=targets is not None)
        if not self.names:
            raise ValueError("ImageMetrics has no metric to compute: set clip, dino, or fid_features with targets")
        masked = [m for m in self.names if m in ("psnr_background", "ssim_background")]
        if masked:
            raise ValueError(f"ImageMetrics has no masks: {', '.join(masked)} can only run in `ddstrans eval --masks`")
        self.n, self.batch_size, self.grid_images = int(n), int(batch_size), int(grid_images)
        self._metrics: dict | None = None
        self._inputs: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._metrics is None:  # models load before training starts: a bad path fails at once, not at step N
            self._metrics = build_metrics(self.names, **self.paths, targets=self.targets_dir is not None)

    def _fixed_inputs(self, trainer, pl_module) -> dict:
        if self._inputs is not None:
            return self._inputs
        if self.images_dir:
            from ddstrans.eval_inputs import load_folder

            s = load_folder(self.images_dir, pl_module.teacher.image_size, limit=self.n, param="images")
            self._inputs = {"pixels": s.floats(), "captions": s.captions}
        else:
            pixels, captions = [], []
            for batch in trainer.datamodule.val_dataloader():
                x = batch.get("pixels")
                if x is None:
                    with torch.no_grad():
                        x = pl_module.teacher.decode_latents(batch["latents"].to(pl_module.device)).float().cpu()
                x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
                pixels.append(x.cpu())
                captions += list(batch.get("caption") or [None] * len(x))
                if sum(len(p) for p in pixels) >= self.n:
                    break
            if not pixels:
                raise ValueError("ImageMetrics: the validation loader gave no images; set images=<folder>")
            self._inputs = {"pixels": torch.cat(pixels)[: self.n], "captions": captions[: self.n]}
        if self.targets_dir and self._metrics:
            from ddstrans.eval_inputs import load_folder

            real = load_folder(self.targets_dir, self._inputs["pixels"].shape[-1], param="targets").floats()
            for k in SET_LEVEL:
                if k in self._metrics:
                    for i in range(0, len(real), self.batch_size):
                        self._metrics[k].add_real(real[i : i + self.batch_size].to(pl_module.device))
        return self._inputs

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._metrics:
            return
        from ddstrans.evaluate import prompts_for
        from ddstrans.metrics import summarize

        data = self._fixed_inputs(trainer, pl_module)
        x_all, captions = data["pixels"], data["captions"]
        for m in self._metrics.values():
            m.to(pl_module.device)
        per_task, grid = {}, [x_all[: self.grid_images]]
        for k, task in enumerate(pl_module.task_table.tasks):
            src, tgt = prompts_for(task, captions)
            for m in self._metrics.values():
                m.reset()
            outs = []
            for i in range(0, len(x_all), self.batch_size):
                x = x_all[i : i + self.batch_size]
                y = pl_module.translate_pixels(x, k, captions[i : i + self.batch_size]).float()
                batch = {"inputs": x.to(pl_module.device), "outputs": y, "source_prompts": src[i : i + self.batch_size],
                         "target_prompts": tgt[i : i + self.batch_size], "masks": None}
                for m in self._metrics.values():
                    m.update_from(batch)
                outs.append(y.cpu())
            grid.append(torch.cat(outs)[: self.grid_images])
            per_task[task.name] = {name: _value(summarize(m)) for name, m in self._metrics.items()}
        for task, values in per_task.items():
            for name, v in values.items():
                pl_module.log(f"val/{task}/{name}", v, sync_dist=False, rank_zero_only=False)
        for name in self.names:
            vals = [v[name] for v in per_task.values() if np.isfinite(v[name])]
            pl_module.log(f"val/{name}", float(np.mean(vals)) if vals else float("nan"), sync_dist=False)
        if trainer.is_global_zero and self.grid_images > 0:
            self._log_grid(trainer, pl_module, grid)

    def _log_grid(self, trainer, pl_module, grid) -> None:
        from ddstrans.evaluate import examples_grid
        from ddstrans.module import log_grid

        image = examples_grid({"all": grid})
        log_grid(trainer.loggers, image, trainer.global_step, "source | " + " | ".join(pl_module.task_table.names),
                 key="val/metrics_grid")


def _value(s: dict) -> float:
    v = s.get("value", s.get("mean"))
    return float("nan") if v is None else float(v)
