"""Shapes-world metrics at validation: the numbers ``ddstrans eval`` prints, logged while training runs.

``val/dds_norm`` says how far the teacher still wants to move the outputs, not whether the edit is right;
on the shapes world the renderer's ground truth says that exactly. At the end of each validation (with the
EMA weights swapped in, as for the grid) this callback translates ``n`` validation inputs per task
(``seeds.VALIDATION``: scenes neither training nor ``ddstrans eval`` uses, so a checkpoint chosen on these figures is
not chosen on the evaluation's inputs) and logs, per task and averaged over tasks:

    val/<task>/target_acc  val/<task>/mask_iou  val/<task>/keep_psnr  val/<task>/diversity
    val/target_acc         val/mask_iou         val/keep_psnr         val/diversity

Every rank computes the same figures (the inputs are fixed validation seeds, a few forward passes), so a
checkpoint callback may monitor them under DDP without a collective.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ddstrans.shapes import seeds
from ddstrans.shapes.evaluation import METRIC_KEYS

KEYS = tuple(k for k in METRIC_KEYS if k != "ms_per_image")  # quality metrics; time is not a validation figure


class ShapesMetrics(Callback):
    def __init__(self, n: int = 32, batch_size: int = 64):
        if n < 2:
            raise ValueError(f"ShapesMetrics needs n >= 2 inputs per task (diversity is a pairwise spread), got {n}")
        self.n, self.batch_size = int(n), int(batch_size)
        self._sets: dict | None = None

    def _eval_sets(self, pl_module) -> dict:
        from ddstrans.shapes.evaluation import build_eval_set

        if self._sets is None:
            self._sets = {t.name: build_eval_set(t, self.n, seed_range=seeds.VALIDATION)
                          for t in pl_module.task_table.tasks}
        return self._sets

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        from ddstrans.shapes.evaluation import score

        per_task = {}
        for k, (name, es) in enumerate(self._eval_sets(pl_module).items()):
            outs = [pl_module.translate_pixels(es.inputs[i : i + self.batch_size], k,
                                               es.src_captions[i : i + self.batch_size]).cpu()
                    for i in range(0, len(es.seeds), self.batch_size)]
            per_task[name] = score(es, torch.cat(outs))
        for name, m in per_task.items():
            for key in KEYS:
                pl_module.log(f"val/{name}/{key}", float(m[key]), sync_dist=False, rank_zero_only=False)
        for key in KEYS:
            pl_module.log(f"val/{key}", float(np.mean([m[key] for m in per_task.values()])), sync_dist=False)
