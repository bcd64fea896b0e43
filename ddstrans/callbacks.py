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

``StepAlignedSigterm``
    Lightning 2.6's SIGTERM handler runs ``dist.broadcast`` *inside the signal handler* — a collective at an
    arbitrary point of each rank's program, paired with whatever collective the other rank is in — and its loop
    also raises on a rank's local flag, so under DDP ranks can leave at different steps or wait on each other
    forever (CI: a 2-process CPU run hung after SIGTERM). This callback replaces that handler with one that only
    records the signal; at ``on_train_batch_end`` (a point every rank reaches for the same step) the ranks
    max-reduce their flags and, when any rank got SIGTERM, all of them set ``trainer.received_sigterm`` — so
    Lightning raises ``SIGTERMException`` on every rank after the same step. The training app always adds it.

``SaveLastCheckpoint``
    On that ``SIGTERMException`` this callback writes ``<checkpoint dir>/last.ckpt`` (rank 0 writes; no barrier,
    so a rank that died cannot hang the save), so a preempted job resumes with
    ``ckpt_path=last hydra.run.dir=<run dir>`` from the step it reached. Only SIGTERM triggers it:
    other exceptions may hit ranks at different places (a save there could hang on the barrier) or leave a state
    that must not replace the last good checkpoint. It also writes ``last.ckpt`` at the end of training when the
    final step is not a multiple of ``every_n_train_steps`` (Lightning's ``ModelCheckpoint`` skips that save once
    it has written any ``last`` in the run), so ``last`` always holds the final weights.
"""

from __future__ import annotations

import os
import signal
import threading
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
    # Streamed straight into a hidden temp file beside the target, never into a memory buffer first: a full-size
    # checkpoint (SD-1.5 generator + AdamW state, over 10 GB) serialised in memory doubles the run's peak memory.
    # A failing save removes the temp file (a killed one is removed by the next run's start).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: say which save failed (full disk: where)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
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


class StepAlignedSigterm(Callback):
    """Record SIGTERM in the handler; decide, on every rank at once, at the end of a training step (see above)."""

    def __init__(self) -> None:
        self.received = False
        self._installed = False
        self._chained = None

    def _record(self, signum, frame) -> None:  # no collectives here: only a flag (and a handler set before fit)
        self.received = True
        if callable(self._chained):
            self._chained(signum, frame)

    def _install(self, trainer) -> None:
        # Lightning registers its handler just before the fit stage runs; these hooks come after that.
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._chained = getattr(trainer._signal_connector, "_original_handlers", {}).get(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._record)  # Lightning's teardown restores the original handler
            self._installed = True

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        got = self.received
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if got else 0.0], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            got = bool(flag.item())
        if got:
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this step

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._installed = False
        self.received = False  # a later fit with the same callbacks starts clean


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
            # Rank 0 writes alone, without the barrier of trainer.save_checkpoint: a rank that died or left at
            # another step (without StepAlignedSigterm) would hang it. DDP replicas hold identical weights.
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
