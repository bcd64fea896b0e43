"""``ddstrans-train``: the Hydra training app.

Configs live in the repository's ``configs/`` directory, shipped inside the package by the build
(``ddstrans.assets``), so the app finds them from any working directory, installed or from a checkout. Users add
their own config directory with Hydra's ``hydra.searchpath=[file:///abs/dir]`` (or ``--config-dir DIR``).

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
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ddstrans.assets import configs_dir
from ddstrans.runtime import (
    Preempted,
    configure_wandb,
    distributed_env,
    in_multirun,
    preempted_message,
    prepare_multirun_ddp,
    rank_zero,
    stopped_short_message,
    teardown_distributed,
)

# The shipped configs/ as an absolute path (ddstrans.assets: the package's copy, or the checkout's); a relative
# config_path would be resolved by Hydra against the calling module.
CONFIG_PATH = str(configs_dir())


def register_config_defaults() -> None:
    """Register ``loss/base``: every key of the ``loss`` group with its default, taken from
    ``ddstrans.guidance.Guidance`` and ``ddstrans.module.LOSS_TERMS`` (their one home); the YAML files of the
    group hold only what they change."""
    from hydra.core.config_store import ConfigStore

    from ddstrans.module import loss_defaults

    ConfigStore.instance().store(group="loss", name="base", node=loss_defaults())


register_config_defaults()


# ---------------------------------------------------------------------- helpers
def save_resolved_config(cfg: DictConfig) -> Path | None:
    """``<run dir>/config_resolved.yaml``: the config with every interpolation resolved (Hydra's
    ``.hydra/config.yaml`` keeps them), written by rank 0 only."""
    if not rank_zero():
        return None
    out = Path(cfg.paths.output_dir) / "config_resolved.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001 - e.g. a missing mandatory value the run itself never reads
        out.write_text(f"# could not resolve every value ({e}); unresolved config follows\n" + OmegaConf.to_yaml(cfg))
    return out


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
    from lightning.pytorch.callbacks import ProgressBar

    from ddstrans.callbacks import StepAlignedSigterm

    def is_bar(c: DictConfig) -> bool:
        target = hydra.utils.get_class(str(c._target_))
        return isinstance(target, type) and issubclass(target, ProgressBar)

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if isinstance(c, DictConfig) and "_target_" in c and not (no_bar and is_bar(c))]
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


def teacher_loss(cfg: DictConfig, teacher) -> dict:
    """The run's ``loss`` settings with the teacher's recommended training settings (the ``train`` section of its
    ``ddstrans_settings.json``) in the keys the config leaves at ``Guidance``'s defaults."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    settings = getattr(teacher, "settings", None)
    return settings.train_loss(loss) if settings is not None else loss


def build_module(cfg: DictConfig, teacher=None):
    """The LightningModule from a composed config (teacher loaded unless given; checked against the config)."""
    from ddstrans.module import DDSTranslationModule
    from ddstrans.savers import apply_teacher_savers
    from ddstrans.user_errors import instantiate_teacher
    from ddstrans.validation import validate_with_teacher

    teacher = teacher if teacher is not None else instantiate_teacher(cfg.teacher)
    validate_with_teacher(cfg, teacher)
    memory = cfg.model.get("memory")
    apply_teacher_savers(teacher, OmegaConf.to_container(memory, resolve=True) if memory is not None else None)
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
        loss=teacher_loss(cfg, teacher),
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
    saved_env = distributed_env()
    in_multirun = prepare_multirun_ddp(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ddstrans.rundir import claim_run_directory, config_snapshot, write_run_config
    from ddstrans.user_errors import instantiate_checked
    from ddstrans.validation import ConfigError, validate_config

    snapshot = config_snapshot(cfg)
    validate_config(cfg)  # before any heavy work and before writing into the run dir: one clear ConfigError line
    ckpt_path = resolve_ckpt_path(cfg)
    lock = claim_run_directory(cfg.paths.output_dir) if rank_zero() else None  # one run per run dir
    loggers: list = []
    try:
        datamodule = instantiate_checked(cfg.data, "data")  # before the teacher: a wrong data config fails fast
        module = build_module(cfg)
        if rank_zero():  # validated, teacher loaded: now the run's files may be written
            write_run_config(cfg.paths.output_dir, snapshot)
            save_resolved_config(cfg)
        loggers = instantiate_loggers(cfg)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg), logger=loggers or False,
                                          **checkpoint_io_plugins(cfg))
        try:
            # weights_only: resuming unpickles no code (tensors, containers and primitives only)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            raise Preempted(preempted_message(cfg, trainer)) from None
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
            teardown_distributed(saved_env)
        if lock is not None:
            lock.release()
    return metric


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
    from ddstrans.shapes.examples import examples_for_run

    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", None) if trainer.checkpoint_callback else None
    if not ckpt:
        print("export_after_fit: no checkpoint was written (callbacks off?); nothing exported", file=sys.stderr)
        return
    out = Path(cfg.paths.checkpoint_dir) / f"{cfg.task_name}-{datetime.now():%Y%m%d-%H%M%S}"
    export_checkpoint(ckpt, out, examples=examples_for_run)
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
        if rank_zero():
            print(e.message, file=sys.stderr)
        raise SystemExit(143) from None
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (trace) below
        from ddstrans.user_errors import first_line, os_error_line

        if isinstance(e, (ConfigError, TeacherLoadError, NonFiniteLossError)):
            line, code = str(e), (1 if isinstance(e, NonFiniteLossError) else 2)
        elif isinstance(e, OSError):  # a full disk, a permission, a missing file: the environment, not a bug
            line, code = os_error_line(e), 1
            if "no space left" in line:
                line += "; the checkpoints already written are complete (each is written to a temp file and renamed)"
        elif type(e).__name__ == "SafetensorError":
            line, code = f"a safetensors file could not be read: {first_line(e)}", 2
        else:
            raise
        if _show_traces():
            raise
        if rank_zero():
            print(f"error: {line}", file=sys.stderr)
        if in_multirun():
            raise  # a sweep records the failed job (Optuna: a failed trial) and goes on
        raise SystemExit(code) from None


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_reporting_errors(cfg)


if __name__ == "__main__":
    main()
