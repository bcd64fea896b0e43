"""Webdataset shards -> training batches.

A shard is a tar file of samples ``KEY.jpg|png|webp|bmp`` (the image), optional ``KEY.txt`` (caption),
optional ``KEY.latents.npy`` (teacher VAE latents, float16, already scaled) and optional ``KEY.json``
(metadata: seed, prompt, source file). ``ddstrans make-shards`` writes them, with a ``manifest.json`` next to
the shards.

Streams (see ``docs/data.md``):

- **training, resampled** (default): every DataLoader worker of every rank draws shards with replacement from
  the whole list, with its own RNG (seeded from the DataLoader's per-epoch base seed, the rank and the worker
  id, so ranks and workers see different streams), then shuffles samples through a buffer. The stream is
  infinite; an epoch is cut at exactly ``batches_per_epoch`` batches **on every rank** (split over the
  workers), so DDP never waits on a rank that ran out of data.
- **training, not resampled**: the shard list is split by rank, then by worker (``shards[r*W + w ::
  R*W]``), each worker cycles through its shards and the epoch is again cut at ``batches_per_epoch``
  batches per rank. With balanced shards and the default epoch length every sample is seen exactly once
  per epoch across all ranks and workers.
- **validation**: deterministic. ``val_urls`` if given; otherwise the first ``val_samples`` samples of the
  (sorted) training shards are held out and removed from the training stream. Every rank validates on the
  same samples, in the same order.

Bad data never crashes: unreadable shards, corrupt or truncated images, members without an image, tiny
images and latents of the wrong shape are skipped and counted (``SkipCounter``), with a warning per skip
(rate-limited) naming the shard, key and reason. A pattern matching no local shard raises one
``FileNotFoundError`` naming the pattern.

Shard lists and manifests are in ``ddstrans.data.shard_lists``, the streams in ``ddstrans.data.shard_streams``;
their names stay importable from here.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter

import torch

from ddstrans.data.samples import SkipCounter, collate, decode_sample, pixels_to_float
from ddstrans.data.shard_lists import REMOTE_PREFIXES, count_samples, expand_urls, read_manifests
from ddstrans.data.shard_streams import OrderedShardReader, ShardStream

__all__ = ["REMOTE_PREFIXES", "OrderedShardReader", "ShardDataModule", "ShardStream", "SkipCounter", "collate",
           "count_samples", "decode_sample", "expand_urls", "pixels_to_float", "read_manifests"]

log = logging.getLogger("ddstrans.data")


# ---------------------------------------------------------------------------------------------- DataModule
def _lightning_base():
    import lightning

    return lightning.LightningDataModule


class ShardDataModule(_lightning_base()):
    """Lightning DataModule over webdataset shards.

    Args:
        urls: shard pattern(s): a path, brace pattern (``dir/shards-{000000..000099}.tar``), glob, directory
            of ``*.tar``, URL, ``::``-separated string or list.
        batch_size: per-rank batch size.
        num_workers: DataLoader workers per rank.
        resolution: training image size (square). Must be a multiple of ``downsample_factor``.
        shuffle_buffer: samples held per worker for shuffling (<= 1: no shuffling).
        resampled: draw shards with replacement (infinite stream, recommended for multi-GPU training).
        batches_per_epoch: batches per rank per epoch (the same on every rank). Default: from
            ``epoch_size``, else from the manifests' sample counts (one pass over the data across all ranks).
        epoch_size: samples per epoch across all ranks (converted to ``batches_per_epoch``).
        val_urls: shards for validation; when absent, ``val_samples`` samples are held out of ``urls``.
        val_samples: size of the held-out / capped validation set (0: no validation).
        val_batch_size: validation batch size (default ``batch_size``).
        use_latents: ``auto`` (use stored latents when every manifest has them at this resolution),
            ``true`` or ``false``.
        downsample_factor: the teacher's VAE factor (8 for Stable Diffusion). Taken from the trained
            module's ``teacher`` when the trainer has one.
        min_size: images whose short side is smaller are skipped.
        rank, world_size: override the distributed position (default: trainer, then env RANK/WORLD_SIZE).
        seed: mixed into the shard and shuffle RNGs.
    """

    def __init__(
        self,
        urls: str | list[str],
        batch_size: int = 8,
        num_workers: int = 4,
        resolution: int = 512,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        batches_per_epoch: int | None = None,
        epoch_size: int | None = None,
        val_urls: str | list[str] | None = None,
        val_samples: int = 16,
        val_batch_size: int | None = None,
        use_latents: bool | str = "auto",
        downsample_factor: int = 8,
        min_size: int = 8,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 4,
        uint8_transfer: bool = True,
    ):
        super().__init__()
        # our __len__ is exact: every worker of every rank is cut at its own share of batches_per_epoch
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
        self.urls_arg, self.val_urls_arg = urls, val_urls
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.resolution = int(resolution)
        self.shuffle_buffer, self.resampled = int(shuffle_buffer), bool(resampled)
        self.batches_per_epoch_arg, self.epoch_size = batches_per_epoch, epoch_size
        self.val_samples = int(val_samples)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.use_latents_arg = use_latents
        self.downsample_factor = int(downsample_factor)
        self.min_size = int(min_size)
        self.rank_arg, self.world_size_arg = rank, world_size
        self.seed = int(seed)
        self.pin_memory, self.persistent_workers, self.prefetch_factor = pin_memory, persistent_workers, prefetch_factor
        self.uint8_transfer = bool(uint8_transfer)
        self.train_stream: ShardStream | None = None
        self.val_reader: OrderedShardReader | None = None
        self._setup_done = False

    # -------------------------------------------------------------- configuration checks
    def _teacher(self):
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return getattr(module, "teacher", None)

    def _position(self) -> tuple[int, int]:
        if self.rank_arg is not None or self.world_size_arg is not None:
            return int(self.rank_arg or 0), int(self.world_size_arg or 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def check_resolution(self, factor: int | None = None) -> None:
        f = int(factor or self.downsample_factor)
        if self.resolution <= 0 or self.resolution % f:
            lo, hi = (self.resolution // f) * f, (self.resolution // f + 1) * f
            raise ValueError(
                f"data.resolution={self.resolution} must be a positive multiple of the teacher's VAE downsample "
                f"factor {f} (latents are resolution/{f} wide); use e.g. {lo or hi} or {hi}"
            )

    def _resolve_latents(self, manifests: list[dict], teacher) -> tuple[bool, tuple | None]:
        want = self.use_latents_arg
        if isinstance(want, str):
            want = {"auto": "auto", "true": True, "false": False, "yes": True, "no": False}.get(want.lower(), want)
        if want is False:
            return False, None
        f = self.downsample_factor
        ok = bool(manifests) and all(m.get("latents") and int(m.get("resolution") or -1) == self.resolution for m in manifests)
        why = "" if ok else f"not every shard directory has latents at resolution {self.resolution} in its manifest"
        if ok and teacher is not None:
            ids = {str(m.get("teacher")) for m in manifests}
            from ddstrans.data.writer import teacher_id

            src = teacher_id(teacher)
            if src and src not in ids:
                ok, why = False, f"latents were made with teacher {sorted(ids)}, training uses {src!r}"
        channels = int(manifests[0].get("latent_channels", 4)) if manifests else 4
        shape = (channels, self.resolution // f, self.resolution // f)
        if want is True:
            if not ok:
                log.warning("use_latents=true although %s", why)
            return True, shape
        if not ok and any(m.get("latents") for m in manifests):
            log.warning("stored latents not used: %s; encoding pixels on the fly", why)
        return ok, shape if ok else None

    # -------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self._setup_done:
            return
        teacher = self._teacher()
        if teacher is not None:
            self.downsample_factor = int(getattr(teacher, "downsample_factor", self.downsample_factor))
        self.check_resolution(getattr(teacher, "image_multiple", None))  # Flux: the VAE factor x its 2x2 packing
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
        urls = expand_urls(self.urls_arg)
        rank, world = self._position()
        manifests = read_manifests(urls)
        self.use_latents, self.latent_shape = self._resolve_latents(manifests, teacher)

        exclude: frozenset[str] = frozenset()
        train_urls = urls
        if self.val_urls_arg:
            self.val_reader = self._reader(expand_urls(self.val_urls_arg), self.val_samples)
        elif self.val_samples > 0:
            reader = self._reader(sorted(urls), self.val_samples)
            keys = [k for k, _ in reader.samples()]
            exclude = frozenset(keys)
            self.val_reader = reader
            if len(keys) < self.val_samples:
                log.warning("only %d validation samples available (val_samples=%d)", len(keys), self.val_samples)

        total = count_samples(urls)
        if self.batches_per_epoch_arg:
            bpe = int(self.batches_per_epoch_arg)
        elif self.epoch_size:
            bpe = math.ceil(int(self.epoch_size) / (self.batch_size * world))
        elif total is not None:
            bpe = max(1, (total - len(exclude)) // (self.batch_size * world))
        else:
            raise ValueError(
                "cannot tell the epoch length: set data.batches_per_epoch or data.epoch_size "
                "(no manifest.json lists these shards)"
            )
        self.batches_per_epoch = bpe
        self.total_samples = total
        self.rank, self.world_size = rank, world
        self.train_stream = ShardStream(
            train_urls, resolution=self.resolution, batch_size=self.batch_size, batches_per_epoch=bpe,
            rank=rank, world_size=world, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
            use_latents=self.use_latents, latent_shape=self.latent_shape, min_size=self.min_size,
            exclude=exclude, seed=self.seed,
        )
        self._setup_done = True
        log.info(
            "shards: %d train shard(s)%s, rank %d/%d, %d batch(es) of %d per rank per epoch, %s, latents=%s",
            len(train_urls), f" ({total} samples)" if total is not None else "", rank, world, bpe, self.batch_size,
            "resampled" if self.resampled else "split by rank/worker", self.use_latents,
        )

    def _reader(self, urls: list[str], limit: int) -> OrderedShardReader:
        return OrderedShardReader(
            urls, resolution=self.resolution, batch_size=self.val_batch_size, limit=limit,
            use_latents=self.use_latents, latent_shape=self.latent_shape, min_size=self.min_size,
        )

    def _loader(self, dataset, num_workers: int) -> torch.utils.data.DataLoader:
        kw: dict = {}
        if num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor:
                kw["prefetch_factor"] = self.prefetch_factor
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), **kw,
        )

    def _ship_uint8(self) -> bool:
        # under a Trainer, workers ship uint8 pixels (4x less shared memory and host->device traffic) and
        # on_after_batch_transfer converts them on the device; used alone, the loader yields float pixels
        return self.uint8_transfer and getattr(self, "trainer", None) is not None

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup("fit")
        self.train_stream.pixels_uint8 = self._ship_uint8()
        trainer = getattr(self, "trainer", None)
        self.train_stream.start_step = int(trainer.global_step) if trainer is not None else 0
        return self._loader(self.train_stream, self.num_workers)

    def val_dataloader(self):
        self.setup("fit")
        if self.val_reader is None:
            return []
        self.val_reader.pixels_uint8 = self._ship_uint8()
        return self._loader(self.val_reader, 0)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        return pixels_to_float(batch) if isinstance(batch, dict) else batch

    @property
    def skipped(self) -> dict:
        """Skip counts of the main process (workers report theirs as warnings in the log)."""
        out: Counter = Counter()
        for r in (self.train_stream, self.val_reader):
            if r is not None:
                out.update(r.stats.counts)
        return dict(out)
