"""An on-the-fly DataModule of procedural images (random coloured blobs and boxes on a coloured background).

For the ``smoke`` experiment and tests: no files, no network. Every image is a pure function of
``(seed, split, index)``, so the validation set is fixed and identical on every rank and run.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def render_blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]: a background colour with 1-3 discs or boxes."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(-1, 1, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        r = rng.uniform(0.12, 0.3)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if rng.random() < 0.5 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        img[mask] = rng.uniform(-1, 1, 3)
    return img


class ProceduralImages(Dataset):
    def __init__(self, length: int, image_size: int, seed: int = 0, split: str = "train"):
        self.length, self.image_size, self.seed = int(length), int(image_size), int(seed)
        self.split_id = {"train": 0, "val": 1, "test": 2}[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        img = render_blobs(rng, self.image_size)
        return {"pixels": torch.from_numpy(img).permute(2, 0, 1).contiguous()}


class ProceduralDataModule(L.LightningDataModule):
    """Batches ``{"pixels": (B, 3, S, S)}`` in [-1, 1]. ``batch_size`` is per device (global = x devices)."""

    def __init__(self, image_size: int = 16, batch_size: int = 4, num_train: int = 64, num_val: int = 4,
                 val_batch_size: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.image_size, self.batch_size, self.num_train, self.num_val = image_size, batch_size, num_train, num_val
        self.val_batch_size = val_batch_size or num_val
        self.seed, self.num_workers = seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ProceduralImages(self.num_train, self.image_size, self.seed, "train")
        self.val_set = ProceduralImages(self.num_val, self.image_size, self.seed, "val")

    def train_dataloader(self) -> DataLoader:
        from ddstrans.data.resumable import train_loader

        return train_loader(self, self.train_set, batch_size=self.batch_size, seed=self.seed,
                            num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=0)
