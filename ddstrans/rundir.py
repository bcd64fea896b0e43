"""One training run per run directory, and nothing written into it before the run is known to be valid.

``claim_run_directory(cfg)`` (rank 0 only; other DDP ranks share rank 0's claim) locks ``<run dir>/run.lock``
(``ddstrans.locks.LockFile``: pid and host; a lock of a dead process on this host is taken over with a message),
so two trainings with the same ``hydra.run.dir`` cannot interleave ``last.ckpt``, grids and config: the second
stops with ``error: run directory ... is in use by pid N`` and exit status 2. Holding the lock, it deletes the
``.*.tmp-<pid>`` files that killed checkpoint saves left in ``checkpoints/``.

``write_run_config(cfg, snapshot)`` writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` (what
Hydra would write at start-up: the configs set ``hydra.output_subdir: null`` so that Hydra does not) once the
config has been validated and the teacher loaded: a rejected resume leaves the run's files as they were.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ddstrans.io_safety import atomic_output, remove_stale_temps
from ddstrans.locks import LockedError, LockFile
from ddstrans.validation import ConfigError

LOCK_NAME = "run.lock"


class RunDirectoryInUse(ConfigError):
    """Another live process trains in this run directory."""


def claim_run_directory(output_dir: str | Path) -> LockFile:
    """Lock the run directory (raises ``RunDirectoryInUse``) and remove temp files of killed checkpoint saves."""
    run = Path(output_dir)
    lock = LockFile(run / LOCK_NAME, what=f"run directory {run}")
    try:
        lock.acquire()
    except LockedError as e:
        raise RunDirectoryInUse(f"{e}; give another hydra.run.dir, or wait for that run to end") from None
    for p in remove_stale_temps(run / "checkpoints"):
        print(f"removed {p}, the temp file of a checkpoint save that was killed", file=sys.stderr)
    return lock


def config_snapshot(cfg: DictConfig) -> str:
    """The composed config as Hydra saves it (unresolved, without the ``hydra`` node), taken before anything
    (e.g. ``data.global_batch_size``) fills in derived values."""
    c = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_yaml(c)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_run_config(output_dir: str | Path, snapshot: str) -> None:
    """``<run dir>/.hydra/{config,hydra,overrides}.yaml`` (Hydra's files, written here after validation)."""
    from hydra.core.hydra_config import HydraConfig

    d = Path(output_dir) / ".hydra"
    _write(d / "config.yaml", snapshot)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        _write(d / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
        _write(d / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))))
