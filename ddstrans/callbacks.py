"""Crash-safety pieces of the training app: atomic checkpoint files and a checkpoint on preemption (SIGTERM).

``AtomicCheckpointIO``
    Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction: for local paths the bytes go to a
    ``tempfile.mkstemp()`` file in the *system* temp directory and are then ``shutil.move``-d over the target. When
    that temp directory is on another filesystem than the run directory (a node-local ``/tmp`` and a shared
    ``logs/``: the usual cluster setup), the move is a copy, and a kill during the copy leaves a truncated
    ``last.ckpt``. Nothing is fsynced either. This plugin writes ``.<name>.tmp-<pid>`` next to the target,
    fsyncs it, ``os.replace``-s it over the target (atomic on POSIX within one filesystem) and fsyncs the directory:
    a kill at any moment leaves either the previous complete file or the new complete file. Remote URLs
    (``s3://`` ...) go through Lightning's own code.

``SaveLastCheckpoint``
    Lightning turns SIGTERM into ``SIGTERMException`` after the current step (under DDP it broadcasts the flag, so
    every rank raises at the same step). This callback then writes ``<checkpoint dir>/last.ckpt`` through
    ``trainer.save_checkpoint`` — a collective call that every rank makes, rank 0 writes — so a preempted job
    resumes with ``ckpt_path=last hydra.run.dir=<run dir>`` from the step it reached. Only SIGTERM triggers it:
    other exceptions may hit ranks at different places (a save there could hang on the barrier) or leave a state
    that must not replace the last good checkpoint. It also writes ``last.ckpt`` at the end of training when the
    final step is not a multiple of ``every_n_train_steps`` (Lightning's ``ModelCheckpoint`` skips that save once
    it has written any ``last`` in the run), so ``last`` always holds the final weights.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def _is_local(path) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that a crash at any moment leaves the old file or the complete new one."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)  # serialise first: a failing torch.save must not touch the directory
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-temp-next-to-target + fsync + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)


class SaveLastCheckpoint(Callback):
    """Write ``last.ckpt`` into the ``ModelCheckpoint`` directory on preemption (SIGTERM) before the process exits,
    and at the end of training when the final step has not been saved yet.

    ``dirpath``: where to write when no ``ModelCheckpoint`` is attached (default: none -> nothing is saved)."""

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: str | None = None

    def _target(self, trainer) -> tuple[Path | None, ModelCheckpoint | None]:
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            name = f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}" if cb.save_last else self.filename
            return Path(cb.dirpath) / name, cb
        return (Path(self.dirpath) / self.filename if self.dirpath else None), None

    def _save(self, trainer, path: Path, cb: ModelCheckpoint | None) -> None:
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank calls it, rank 0 writes
        self._mark_saved(trainer, path, cb)

    def _mark_saved(self, trainer, path: Path, cb: ModelCheckpoint | None) -> None:
        self.saved_path = str(path)
        if cb is not None:
            cb.last_model_path = str(path)
            cb._last_global_step_saved = trainer.global_step
            if hasattr(cb, "_last_checkpoint_saved"):
                cb._last_checkpoint_saved = True  # its own on_train_end need not write the same file again

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if trainer.state.fn is None or str(trainer.state.fn.value) != "fit":
            return
        path, cb = self._target(trainer)
        if path is None:
            rank_zero_info("SIGTERM: no checkpoint directory configured; nothing saved")
            return
        if trainer.world_size > 1:
            # Ranks may raise at different steps (Lightning forwards SIGTERM to the children, which check it at
            # their own step boundary), so a collective save (barrier) can deadlock: rank 0 writes alone. DDP
            # replicas hold identical weights after every optimizer step.
            if trainer.is_global_zero:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
                self._mark_saved(trainer, path, cb)
        else:
            self._save(trainer, path, cb)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        path, cb = self._target(trainer)
        if path is None or cb is None or not cb.save_last or trainer.global_step == 0:
            return
        if cb._last_global_step_saved == trainer.global_step and Path(cb.last_model_path or "") == path:
            return
        self._save(trainer, path, cb)
