"""Runtime plumbing of a training run, apart from its math and from argument parsing: which process is rank 0,
wandb credentials, DDP inside a Hydra sweep, and the messages of a run that was cut short or preempted."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, open_dict, read_write

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK")


def rank_zero() -> bool:
    """True in the process that prints and writes files (rank 0 of every launcher's numbering)."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb(lg_cfg: DictConfig) -> None:
    """Online with credentials, else offline with one clear message (rank 0 only)."""
    forced = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    if lg_cfg.get("offline") or forced:
        with open_dict(lg_cfg):
            lg_cfg.offline = True
        return
    if not wandb_has_credentials():
        with open_dict(lg_cfg):
            lg_cfg.offline = True
        if rank_zero():
            print(f"wandb: no credentials (WANDB_API_KEY or `wandb login`): logging OFFLINE to {lg_cfg.save_dir}/wandb; "
                  "upload later with `wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr)


def uses_subprocess_ddp(cfg: DictConfig) -> bool:
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    n = devices if isinstance(devices, int) else (len(devices) if hasattr(devices, "__len__") else 2)
    return strategy.startswith("ddp") and "spawn" not in strategy and "fork" not in strategy and n not in (0, 1)


def prepare_multirun_ddp(cfg: DictConfig) -> bool:
    """The Hydra-multirun + Lightning-DDP trap: Lightning's subprocess launcher re-executes ``sys.argv``; in a
    sweep that is ``-m a=1,2`` -> each child would launch the whole sweep and the next job's rendezvous fails.
    Here, in multirun mode, the command line becomes this job's own overrides and ``hydra.run.dir`` this job's
    directory, so each child runs exactly this job (in RUN mode) in the same directory. Returns True when the
    caller must tear the process group down after the job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return False
    if uses_subprocess_ddp(cfg) and os.environ.get("LOCAL_RANK") is None:
        sys.argv = [sys.argv[0], *[o for o in hc.overrides.task if not o.startswith("hydra.")], "hydra.mode=RUN"]
        with read_write(hc), open_dict(hc):
            hc.run.dir = hc.runtime.output_dir
    return True


def distributed_env() -> dict:
    """The process-group variables of the environment, as ``teardown_distributed`` restores them."""
    return {k: os.environ.get(k) for k in DIST_ENV}


def teardown_distributed(saved_env: dict) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in DIST_ENV:
        if saved_env.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = saved_env[k]


class Preempted(SystemExit):
    """SIGTERM ended the run (after writing last.ckpt when checkpoints are on); exit status 143."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message


def stopped_short_message(cfg: DictConfig, trainer) -> str | None:
    """What to do when fit ended before ``trainer.max_steps`` (``trainer.max_time`` reached, or a callback stopped
    it): Lightning ends such a run as quietly as a finished one, and on a slow machine the main job's time limit, a
    safety net, would otherwise leave late-learned tasks untrained without a word."""
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    if max_steps <= 0 or trainer.global_step >= max_steps or trainer.interrupted:
        return None
    return (f"training stopped at step {trainer.global_step} of trainer.max_steps={max_steps} (trainer.max_time="
            f"{cfg.trainer.get('max_time')} reached, or a callback stopped it); what was saved and exported is that "
            f"step's. To finish: {resume_overrides(cfg)} trainer.max_time=null")


def preempted_message(cfg: DictConfig, trainer) -> str:
    saved = [c.saved_path for c in trainer.callbacks if type(c).__name__ == "SaveLastCheckpoint" and c.saved_path]
    where = f"saved {saved[0]}" if saved else "no checkpoint written (callbacks without a checkpoint directory)"
    return f"preempted (SIGTERM) at step {trainer.global_step}: {where}; resume with {resume_overrides(cfg)}"


def resume_overrides(cfg: DictConfig) -> str:
    """The overrides that continue this run from its last checkpoint (the messages of a cut or preempted run)."""
    return f"ckpt_path=last hydra.run.dir={cfg.paths.output_dir}"


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
