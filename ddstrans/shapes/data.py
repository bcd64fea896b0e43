"""An on-the-fly DataModule of shapes-world scenes (the embedded default world).

Training scenes are the first ``num_train`` seeds of ``seeds.TRANSLATOR_TRAIN``; validation scenes come from
``seeds.VALIDATION``, never seen in training nor scored by evaluation. Each batch also carries the scene ``caption`` (usable
as the source prompt) and its ``seed`` (so metrics can re-render the ground truth).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ddstrans.shapes import seeds
from ddstrans.shapes.world import SIZE, render_scene, to_model


class ShapeScenes(Dataset):
    def __init__(self, seeds: range, **overrides):
        self.seeds, self.overrides = seeds, overrides

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict:
        seed = self.seeds[i]
        scene = render_scene(seed, **self.overrides)
        return {"pixels": to_model(scene["image"])[0], "caption": scene["caption"], "seed": torch.tensor(seed)}


class ShapesDataModule(L.LightningDataModule):
    """Batches ``{"pixels": (B, 3, 32, 32), "caption": [...], "seed": (B,)}``; ``batch_size`` is per device.

    ``overrides`` fixes scene attributes (e.g. ``{"color": "red"}`` to train on red shapes only).
    """

    def __init__(self, batch_size: int = 16, num_train: int = 100_000, num_val: int = 8, val_batch_size: int | None = None,
                 num_workers: int = 0, overrides: dict | None = None, image_size: int = 32, seed: int = 0):
        super().__init__()
        if image_size != SIZE:
            raise ValueError(f"the shapes world renders {SIZE}x{SIZE} images; image_size={image_size} is not supported")
        self.batch_size, self.num_train, self.num_val = batch_size, num_train, num_val
        self.val_batch_size = val_batch_size or num_val
        self.num_workers, self.overrides, self.image_size = num_workers, dict(overrides or {}), image_size
        self.seed = int(seed)  # the training order: a function of (seed, epoch), resumable mid-epoch

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ShapeScenes(seeds.take(seeds.TRANSLATOR_TRAIN, 0, self.num_train), **self.overrides)
        self.val_set = ShapeScenes(seeds.take(seeds.VALIDATION, 0, self.num_val), **self.overrides)

    def train_dataloader(self) -> DataLoader:
        from ddstrans.data.resumable import train_loader

        return train_loader(self, self.train_set, batch_size=self.batch_size, seed=self.seed,
                            num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=0)
