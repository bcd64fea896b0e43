"""``ddstrans-train``: the Hydra training app.

Configs live in the repository's ``configs/`` directory, found from this file's location (``../../configs``), so an
editable install from a clone finds them wherever it is launched from. ``--config-dir DIR`` adds more.

    ddstrans-train experiment=smoke
    ddstrans-train experiment=smoke trainer=ddp trainer.devices=2 trainer.accelerator=cpu
    ddstrans-train -m experiment=smoke optim.lr=1e-4,3e-4
    ddstrans-train experiment=smoke ckpt_path=last hydra.run.dir=logs/smoke/runs/<old run>

Runs write into ``logs/<task_name>/runs/<time>/`` (checkpoints/, val/, csv/ or wandb/, .hydra/).
The main function returns ``cfg.optimized_metric`` (for the Optuna sweeper).
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

# The repository's configs/, as an absolute path computed from this file (a relative config_path would be
# resolved by Hydra as a *package* path when the app runs as the installed console script).
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "configs")
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK")


# ---------------------------------------------------------------------- Hydra targets used by configs
def tiny_random_teacher(cache_dir: str, prediction_type: str = "epsilon", with_vae: bool = True, seed: int = 0):
    """Load the tiny random teacher from ``cache_dir``, writing it first if absent (atomic: safe when several
    DDP processes start at once)."""
    from ddstrans.teacher import Teacher
    from ddstrans.testing import make_tiny_sd

    root = Path(cache_dir).expanduser() / f"{prediction_type}{'' if with_vae else '-pixel'}-s{seed}"
    if not (root / "unet").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        make_tiny_sd(tmp / "t", prediction_type=prediction_type, with_vae=with_vae,
                     sample_size=8 if with_vae else 16, seed=seed)
        try:
            os.replace(tmp / "t", root)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return Teacher.from_pretrained(root)


# ---------------------------------------------------------------------- helpers
def _rank_zero() -> bool:
    return all(int(os.environ.get(k, 0)) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def save_resolved_config(cfg: DictConfig) -> Path | None:
    """``<run dir>/config_resolved.yaml``: the config with every interpolation resolved (Hydra's
    ``.hydra/config.yaml`` keeps them), written by rank 0 only."""
    if not _rank_zero():
        return None
    out = Path(cfg.paths.output_dir) / "config_resolved.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001 - e.g. a missing mandatory value the run itself never reads
        out.write_text(f"# could not resolve every value ({e}); unresolved config follows\n" + OmegaConf.to_yaml(cfg))
    return out


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
        if _rank_zero():
            print(f"wandb: no credentials (WANDB_API_KEY or `wandb login`): logging OFFLINE to {lg_cfg.save_dir}/wandb; "
                  "upload later with `wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr)


def instantiate_loggers(cfg: DictConfig) -> list:
    loggers = []
    for _, lg_cfg in (cfg.get("logger") or {}).items():
        if isinstance(lg_cfg, DictConfig) and "_target_" in lg_cfg:
            if lg_cfg._target_.endswith("WandbLogger"):
                configure_wandb(lg_cfg)
            loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers


def instantiate_callbacks(cfg: DictConfig) -> list:
    """The ``callbacks`` group plus ``StepAlignedSigterm``; progress-bar callbacks are left out under ``trainer.enable_progress_bar=false``
    (Lightning refuses the combination, and the flag is what a user types to silence a run)."""
    no_bar = (cfg.get("trainer") or {}).get("enable_progress_bar", True) is False
    from ddstrans.callbacks import StepAlignedSigterm

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if isinstance(c, DictConfig) and "_target_" in c
                 and not (no_bar and str(c._target_).split(".")[-1] in ("TQDMProgressBar", "RichProgressBar"))]
    return [*callbacks, StepAlignedSigterm()]  # not optional: Lightning's own SIGTERM handling can hang DDP


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    from ddstrans.validation import MissingCheckpointError

    """``null`` -> None; ``last`` -> <run dir>/checkpoints/last.ckpt (must exist); else a file path."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "", "null"):
        return None
    if str(ckpt) == "last":
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise MissingCheckpointError(
                f"ckpt_path=last: no {path}. 'last' is looked up in this run's directory; to resume a run pass "
                "its directory too (hydra.run.dir=<old run dir>) or give ckpt_path=<path to .ckpt>")
        return str(path)
    path = Path(hydra.utils.to_absolute_path(str(ckpt)))
    if not path.is_file():
        raise MissingCheckpointError(f"ckpt_path={ckpt}: no such file")
    return str(path)


def _uses_subprocess_ddp(cfg: DictConfig) -> bool:
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
    if _uses_subprocess_ddp(cfg) and os.environ.get("LOCAL_RANK") is None:
        sys.argv = [sys.argv[0], *[o for o in hc.overrides.task if not o.startswith("hydra.")], "hydra.mode=RUN"]
        with read_write(hc), open_dict(hc):
            hc.run.dir = hc.runtime.output_dir
    return True


def _teardown_distributed(saved_env: dict) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in _DIST_ENV:
        if saved_env.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = saved_env[k]


def build_module(cfg: DictConfig, teacher=None):
    """The LightningModule from a composed config (teacher loaded unless given; checked against the config)."""
    from ddstrans.module import DDSTranslationModule
    from ddstrans.validation import validate_with_teacher

    from ddstrans.user_errors import instantiate_teacher

    teacher = teacher if teacher is not None else instantiate_teacher(cfg.teacher)
    validate_with_teacher(cfg, teacher)
    inst = hydra.utils.instantiate
    optim = cfg.optim
    try:
        run_config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. hydra resolvers outside a Hydra run
        run_config = OmegaConf.to_container(cfg, resolve=False)
    return DDSTranslationModule(
        teacher=teacher,
        tasks=OmegaConf.to_container(cfg.tasks.tasks, resolve=True),
        generator=inst(cfg.generator),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=inst(optim.optimizer),
        scheduler=inst(optim.scheduler) if optim.get("scheduler") and "_target_" in optim.scheduler else None,
        scheduler_interval=optim.get("scheduler_interval", "step"),
        ema=OmegaConf.to_container(optim.ema, resolve=True) if optim.get("ema") else {"enabled": False},
        validation=OmegaConf.to_container(cfg.model.validation, resolve=True),
        teacher_dtype=cfg.model.get("teacher_dtype", "auto"),
        seed=cfg.seed,
        run_config=run_config,
    )


def _single_log_handler() -> None:
    """Lightning adds its own console handler; under Hydra (root handlers: console + run-dir log file) every
    Lightning message would print twice. Let Hydra's handlers alone print them (and log them to the file)."""
    import logging

    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True


def train(cfg: DictConfig) -> float | None:
    """Fit a generator as configured; returns the value of ``cfg.optimized_metric`` (or None)."""
    import lightning as L
    import torch

    from ddstrans.cli.common import quiet_libraries

    quiet_libraries()
    _single_log_handler()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*LeafSpec.*")
    saved_env = {k: os.environ.get(k) for k in _DIST_ENV}
    in_multirun = prepare_multirun_ddp(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ddstrans.validation import ConfigError, validate_config

    from ddstrans.rundir import claim_run_directory, config_snapshot, write_run_config
    from ddstrans.user_errors import instantiate_checked

    snapshot = config_snapshot(cfg)
    validate_config(cfg)  # before any heavy work and before writing into the run dir: one clear ConfigError line
    ckpt_path = resolve_ckpt_path(cfg)
    lock = claim_run_directory(cfg.paths.output_dir) if _rank_zero() else None  # one run per run dir
    loggers: list = []
    try:
        datamodule = instantiate_checked(cfg.data, "data")  # before the teacher: a wrong data config fails fast
        module = build_module(cfg)
        if _rank_zero():  # validated, teacher loaded: now the run's files may be written
            write_run_config(cfg.paths.output_dir, snapshot)
            save_resolved_config(cfg)
        loggers = instantiate_loggers(cfg)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg), logger=loggers or False,
                                          **checkpoint_io_plugins(cfg))
        try:
            # weights_only: resuming unpickles no code (tensors, containers and primitives only)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            raise Preempted(_preempted_message(cfg, trainer)) from None
        except pickle.UnpicklingError as e:
            if ckpt_path is None:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"ckpt_path={ckpt_path}: refusing to unpickle it (resume loads checkpoints with "
                              f"weights_only=True; it holds other objects: {first})") from None
        if trainer.global_step == 0 and int(cfg.trainer.get("max_steps") or -1) != 0 and not trainer.interrupted:
            raise ConfigError("no training step ran: the training data yielded no batch (data smaller than one "
                              "batch, or an empty shard list); nothing was trained or saved")
        short = stopped_short_message(cfg, trainer)
        if short and trainer.is_global_zero:
            print(short, file=sys.stderr, flush=True)
        metric = None
        name = cfg.get("optimized_metric")
        if name and name in trainer.callback_metrics:
            metric = float(trainer.callback_metrics[name])
        if cfg.get("export_after_fit") and trainer.is_global_zero:
            _export_after_fit(cfg, trainer)
    finally:
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                import wandb

                wandb.finish()
        if in_multirun:
            _teardown_distributed(saved_env)
        if lock is not None:
            lock.release()
    return metric


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
            f"step's. To finish: {_resume_overrides(cfg)} trainer.max_time=null")


def _preempted_message(cfg: DictConfig, trainer) -> str:
    saved = [c.saved_path for c in trainer.callbacks if type(c).__name__ == "SaveLastCheckpoint" and c.saved_path]
    where = f"saved {saved[0]}" if saved else "no checkpoint written (callbacks without a checkpoint directory)"
    return f"preempted (SIGTERM) at step {trainer.global_step}: {where}; resume with {_resume_overrides(cfg)}"


def _resume_overrides(cfg: DictConfig) -> str:
    """The overrides that continue this run from its last checkpoint (the messages of a cut or preempted run)."""
    return f"ckpt_path=last hydra.run.dir={cfg.paths.output_dir}"


def checkpoint_io_plugins(cfg: DictConfig) -> dict:
    """``plugins=[AtomicCheckpointIO()]`` for the trainer unless the config brings its own plugins or a strategy
    with its own checkpoint format (FSDP/DeepSpeed)."""
    from ddstrans.callbacks import AtomicCheckpointIO

    if cfg.trainer.get("plugins") is not None:
        return {}
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if not (strategy == "auto" or strategy.startswith("ddp") or strategy in ("single_device", "dp")):
        return {}
    return {"plugins": [AtomicCheckpointIO()]}


def _export_after_fit(cfg: DictConfig, trainer) -> None:
    from datetime import datetime

    from ddstrans.export import export_checkpoint

    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", None) if trainer.checkpoint_callback else None
    if not ckpt:
        print("export_after_fit: no checkpoint was written (callbacks off?); nothing exported", file=sys.stderr)
        return
    out = Path(cfg.paths.checkpoint_dir) / f"{cfg.task_name}-{datetime.now():%Y%m%d-%H%M%S}"
    export_checkpoint(ckpt, out)
    print(f"exported translator to {out}")


def compose(overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose the training config in Python (tests, notebooks), as ``ddstrans-train`` would.

    With ``output_dir``, ``${hydra:runtime.output_dir}`` resolves to it (HydraConfig is set), so
    ``train(compose([...], tmp))`` runs a whole training job in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides or []), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(Path(output_dir).resolve())
            cfg.hydra.runtime.cwd = os.getcwd()
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def _show_traces() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", "DDSTRANS_DEBUG"))


def run_reporting_errors(cfg: DictConfig) -> float | None:
    """``train(cfg)``; user errors (bad config, missing teacher or checkpoint, a run stopped by non-finite losses)
    become one ``error: ...`` line and exit status 2 (1 for a stopped run); SIGTERM exits 143 after the save.
    ``HYDRA_FULL_ERROR=1`` or ``DDSTRANS_DEBUG=1`` re-raise with the stack trace."""
    from ddstrans.module import NonFiniteLossError
    from ddstrans.teacher import TeacherLoadError
    from ddstrans.validation import ConfigError

    try:
        return train(cfg)
    except Preempted as e:
        if _rank_zero():
            print(e.message, file=sys.stderr)
        raise SystemExit(143) from None
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (trace) below
        from ddstrans.user_errors import first_line, os_error_line

        if isinstance(e, (ConfigError, TeacherLoadError, NonFiniteLossError)):
            line, code = str(e), (1 if isinstance(e, NonFiniteLossError) else 2)
        elif isinstance(e, OSError):  # a full disk, a permission, a missing file: the environment, not a bug
            line, code = os_error_line(e), 1
            if "no space left" in line and _rank_zero():
                line += "; the checkpoints already written are complete (each is written to a temp file and renamed)"
        elif type(e).__name__ == "SafetensorError":
            line, code = f"a safetensors file could not be read: {first_line(e)}", 2
        else:
            raise
        if _show_traces():
            raise
        if _rank_zero():
            print(f"error: {line}", file=sys.stderr)
        if _in_multirun():
            raise  # a sweep records the failed job (Optuna: a failed trial) and goes on
        raise SystemExit(code) from None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_reporting_errors(cfg)


if __name__ == "__main__":
    main()
