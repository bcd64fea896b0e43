"""Shard streams: the training stream (``ShardStream``) and the deterministic, ordered reader of validation and
evaluation shards (``OrderedShardReader``). How they split shards over ranks and workers is described in
``ddstrans.data.shards``; ``ShardDataModule`` builds them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import torch

from ddstrans.data.samples import SkipCounter, collate, decode_sample

log = logging.getLogger("ddstrans.data")


def _worker() -> tuple[int, int, int | None]:
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1, None
    return info.id, info.num_workers, info.seed


def _raw_samples(url: str, stats: SkipCounter) -> Iterator[dict]:
    import webdataset as wds

    yield from wds.tarfile_to_samples(handler=stats.handler)(iter([{"url": url}]))


class ShardStream(torch.utils.data.IterableDataset):
    """An iterable of batch dicts over shards for one rank (see the module docstring for the modes)."""

    def __init__(
        self,
        urls: list[str],
        *,
        resolution: int,
        batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        use_latents: bool = False,
        latent_shape: tuple[int, int, int] | None = None,
        min_size: int = 0,
        exclude: frozenset[str] = frozenset(),
        seed: int = 0,
    ):
        super().__init__()
        self.urls = list(urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = rank, world_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.use_latents = use_latents
        self.latent_shape = latent_shape
        self.min_size = min_size
        self.exclude = exclude
        self.seed = seed
        self.stats = SkipCounter(f"shards[rank {rank}]")
        self.pixels_uint8 = False
        self.start_step = 0  # the trainer's global step when the loader is made (set by ShardDataModule)

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """Batches this worker yields per epoch: the rank's total split as evenly as possible."""
        n, w = divmod(self.batches_per_epoch, num_workers)
        return n + (1 if worker < w else 0)

    def _rng(self, worker: int, base_seed: int | None) -> random.Random:
        # Seeded by (seed, the global step the loader started at, torch's base seed of this iterator - drawn from
        # the seeded global RNG, new for each epoch's fresh workers -, this copy's epoch count, rank, worker): a run
        # resumed at step k draws the same stream every time, and not the stream of a run that starts at step 0
        # (the uninterrupted run's stream past step k is not replayed: that would need the shuffle buffer's state;
        # docs/reliability.md). Persistent workers keep their copy across epochs: count this copy's epochs too.
        if base_seed is None:  # main-process loading: draw from torch's RNG (differs per epoch)
            base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._epoch = getattr(self, "_epoch", -1) + 1
        return random.Random(f"{self.seed}/{self.start_step}/{base_seed}/{self._epoch}/{self.rank}/{worker}")

    def _shard_order(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self.urls[self.rank * num_workers + worker :: self.world_size * num_workers]
        if not mine:
            raise RuntimeError(
                f"{len(self.urls)} shard(s) cannot be split over {self.world_size} rank(s) x {num_workers} "
                "worker(s) without resampling: use resampled=true, fewer workers or more shards"
            )
        while True:
            order = list(mine)
            if self.shuffle_buffer > 1:
                rng.shuffle(order)
            yield from order

    def _samples(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        empty_in_a_row = 0
        limit = max(2 * len(self.urls), 8)
        for url in self._shard_order(worker, num_workers, rng):
            n = 0
            for raw in _raw_samples(url, self.stats):
                if self.exclude and f"{url}\0{raw.get('__key__')}" in self.exclude:
                    continue
                s = decode_sample(
                    raw, resolution=self.resolution, use_latents=self.use_latents, latent_shape=self.latent_shape,
                    min_size=self.min_size, stats=self.stats, uint8=self.pixels_uint8,
                )
                if s is not None:
                    n += 1
                    yield s
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise RuntimeError(
                    f"no usable sample in {empty_in_a_row} shard reads in a row (e.g. {url}); skips: {self.stats.as_dict()}"
                )

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                if len(buf) < min(self.shuffle_buffer, 64):
                    continue  # warm up a little before the first yield
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, base_seed = _worker()
        rng = self._rng(worker, base_seed)
        todo = self.worker_batches(worker, num_workers)
        if todo == 0:
            return
        samples = self._shuffled(self._samples(worker, num_workers, rng), rng)
        chunk: list[dict] = []
        reported = self.stats.total  # each batch carries the samples skipped since the previous one (per worker):
        for s in samples:            # the module sums them into train/skipped_samples
            chunk.append(s)
            if len(chunk) == self.batch_size:
                batch = collate(chunk)
                batch["skipped_samples"] = torch.tensor(self.stats.total - reported)
                reported = self.stats.total
                yield batch
                chunk = []
                todo -= 1
                if todo == 0:
                    return

    def __len__(self) -> int:
        return self.batches_per_epoch


class OrderedShardReader(torch.utils.data.IterableDataset):
    """Deterministic, unshuffled, unsplit reading (validation): the first ``limit`` usable samples of
    ``urls`` in order, batched (last batch partial). Identical on every rank."""

    def __init__(self, urls: list[str], *, resolution: int, batch_size: int, limit: int = 0,
                 use_latents: bool = False, latent_shape=None, min_size: int = 0, with_raw_keys: bool = False):
        super().__init__()
        self.urls = list(urls)
        self.resolution, self.batch_size, self.limit = resolution, batch_size, limit
        self.use_latents, self.latent_shape, self.min_size = use_latents, latent_shape, min_size
        self.stats = SkipCounter("validation shards")
        self.pixels_uint8 = False

    def samples(self) -> Iterator[tuple[str, dict]]:
        n = 0
        for url in self.urls:
            for raw in _raw_samples(url, self.stats):
                s = decode_sample(raw, resolution=self.resolution, use_latents=self.use_latents,
                                  latent_shape=self.latent_shape, min_size=self.min_size, stats=self.stats,
                                  uint8=self.pixels_uint8)
                if s is None:
                    continue
                yield f"{url}\0{raw.get('__key__')}", s
                n += 1
                if self.limit and n >= self.limit:
                    return

    def __iter__(self) -> Iterator[dict]:
        chunk = []
        for _, s in self.samples():
            chunk.append(s)
            if len(chunk) == self.batch_size:
                yield collate(chunk)
                chunk = []
        if chunk:
            yield collate(chunk)
