"""A shuffling sampler that a resumed run continues where the interrupted one stopped.

Why: PyTorch's ``RandomSampler`` draws each epoch's order from the global RNG at the moment the epoch starts, and
Lightning restarts a non-resumable loader from the beginning of the epoch after a mid-epoch resume, so a resumed
run would see other batches than the uninterrupted run. Here each epoch's order is a function of ``(seed,
epoch)`` (``DistributedSampler``'s own permutation, which also shards it by rank under DDP, so Lightning does not
wrap it), and when an epoch starts the sampler skips the batches Lightning's restored loop progress says were
already trained in it. The batches of a resumed run are then exactly those of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, ``seed + epoch``) that skips ``batches_done() * batch_size`` indices at
    the start of an epoch."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 batches_done: Callable[[], int] | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self.batch_size = int(batch_size)
        self.batches_done = batches_done

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        skip = int(self.batches_done() or 0) * self.batch_size if self.batches_done is not None else 0
        return iter(order[skip:])


def trainer_batches_done(datamodule) -> Callable[[], int]:
    """Batches of the current epoch that the datamodule's trainer has completed (0 at a fresh epoch; on a
    mid-epoch resume, the restored count). Read when an epoch's iteration starts."""

    def done() -> int:
        trainer = getattr(datamodule, "trainer", None)
        if trainer is None:
            return 0
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        except AttributeError:
            return 0

    return done


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position lives in Lightning's loop progress (see ``ResumableSampler``); the
    ``state_dict``/``load_state_dict`` pair tells Lightning it resumes mid-epoch (no "not resumable" warning)."""

    def state_dict(self) -> dict:
        return {"sampler": type(self.sampler).__name__, "epoch": int(getattr(self.sampler, "epoch", 0))}

    def load_state_dict(self, state: dict) -> None:
        pass  # the position is restored with Lightning's loop progress, which ResumableSampler reads


def train_loader(datamodule, dataset: Dataset, *, batch_size: int, seed: int, num_workers: int = 0):
    """The training ``DataLoader`` of an in-memory/procedural dataset: shuffled per ``(seed, epoch)``, sharded by
    rank, resumable mid-epoch (see the module docstring)."""
    trainer = getattr(datamodule, "trainer", None)
    replicas, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, batch_size=batch_size, seed=seed, num_replicas=replicas, rank=rank,
                               batches_done=trainer_batches_done(datamodule))
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
