"""Checks of a composed training config that run before any heavy work (before the teacher is loaded).

``validate_config(cfg)`` raises ``ConfigError`` (a ``ValueError``) with one line that says what is wrong and what
to write instead; ``ddstrans-train`` prints it as ``error: ...`` and exits with status 2 (``HYDRA_FULL_ERROR=1`` or
``DDSTRANS_DEBUG=1`` show the stack trace). ``validate_with_teacher(cfg, teacher)`` runs the checks that need the
loaded teacher (resolution vs. the VAE's downsampling factor), still before any training step.

``data.batch_size`` is **per device**. A config may instead give ``data.global_batch_size``: it must then be
divisible by world size x ``trainer.accumulate_grad_batches``, and the per-device batch size is derived from it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A training config that cannot work; the message is one line meant for the user."""


class MissingCheckpointError(ConfigError, FileNotFoundError):
    """``ckpt_path`` names a checkpoint that does not exist."""


def _get(cfg, key: str, default=None):
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required (it is '???' in the config): pass {key}=...") from None


def world_size(cfg) -> int:
    """Processes the trainer config asks for (devices x nodes); ``auto``/-1 count visible GPUs for GPU runs."""
    t = cfg.get("trainer") or {}
    devices = t.get("devices", 1)
    accel = str(t.get("accelerator", "auto"))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in ("auto", -1) or devices is None:
        n = 1
        if accel in ("gpu", "cuda", "auto"):
            try:
                import torch

                n = max(1, torch.cuda.device_count())
            except Exception:  # noqa: BLE001
                n = 1
    else:
        n = int(devices)
    return max(1, n) * max(1, int(t.get("num_nodes", 1) or 1))


def _check_tasks(cfg) -> None:
    tasks_cfg = cfg.get("tasks")
    tasks = tasks_cfg.get("tasks") if isinstance(tasks_cfg, DictConfig) else None
    if tasks is None or len(tasks) == 0:
        raise ConfigError("no tasks: tasks.tasks is empty; pick a task list (tasks=smoke, tasks=cat2animals, ...) "
                          "or give at least one {name, source, target}")
    names = []
    for i, t in enumerate(tasks):
        if not isinstance(t, DictConfig):
            raise ConfigError(f"tasks.tasks[{i}] must be a mapping {{name, source, target}}, got {t!r}")
        missing = [k for k in ("name", "source", "target") if t.get(k) in (None, "", [])]
        if missing:
            raise ConfigError(f"tasks.tasks[{i}] ({t.get('name', '?')!r}) lacks {', '.join(missing)}")
        names.append(str(t.name))
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ConfigError(f"duplicate task name(s) {', '.join(map(repr, dup))} in tasks.tasks: names must be unique "
                          "(they select the task at export/translate time)")


def _num(key: str, v, kind=float):
    """``v`` as a number (``kind``), or ``ConfigError`` naming ``key`` (``optim.lr=abc``)."""
    if isinstance(v, bool):
        raise ConfigError(f"{key}={v}: must be a number")
    try:
        x = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={v}: must be {'an integer' if kind is int else 'a number'}") from None
    if kind is int and isinstance(v, float) and v != x:
        raise ConfigError(f"{key}={v}: must be an integer")
    return x


def _check_positive(cfg) -> None:
    max_steps = _get(cfg, "trainer.max_steps", -1)
    max_epochs = _get(cfg, "trainer.max_epochs", None)
    max_steps = None if max_steps is None else _num("trainer.max_steps", max_steps, int)
    max_epochs = None if max_epochs is None else _num("trainer.max_epochs", max_epochs, int)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(f"trainer.max_steps={max_steps}: must be a positive number of optimizer steps "
                          "(or -1 with trainer.max_epochs)")
    if (max_steps is None or max_steps == -1) and (max_epochs is None or max_epochs <= 0):
        raise ConfigError("trainer.max_steps=-1 and no positive trainer.max_epochs: the run would never end; "
                          "set trainer.max_steps=N")
    for key in ("optim.lr", "optim.optimizer.lr"):
        v = _get(cfg, key, None)
        if v is not None and not _num(key, v) > 0:
            raise ConfigError(f"{key}={v}: the learning rate must be > 0")
        if v is not None and not math.isfinite(_num(key, v)):
            raise ConfigError(f"{key}={v}: the learning rate must be finite")
    for key in ("data.batch_size", "trainer.accumulate_grad_batches", "data.image_size", "data.resolution",
                "data.num_train", "data.num_val"):
        v = _get(cfg, key, None)
        if v is not None and _num(key, v, int) <= 0:
            raise ConfigError(f"{key}={v}: must be >= 1")
    val = _get(cfg, "trainer.val_check_interval", None)
    if val is not None and _num("trainer.val_check_interval", val) <= 0:
        raise ConfigError(f"trainer.val_check_interval={val}: must be > 0 (steps, or a fraction of an epoch)")
    every = _get(cfg, "callbacks.model_checkpoint.every_n_train_steps", None)
    if every is not None and _num("callbacks.model_checkpoint.every_n_train_steps", every, int) < 0:
        raise ConfigError(f"callbacks.model_checkpoint.every_n_train_steps={every}: must be >= 0")
    n = _get(cfg, "loss.max_consecutive_nonfinite", None)
    if n is not None and _num("loss.max_consecutive_nonfinite", n, int) < 0:
        raise ConfigError(f"loss.max_consecutive_nonfinite={n}: must be >= 0 (0: never stop)")


def _check_enough_data(cfg) -> None:
    """A finite training set smaller than one global batch yields no batch (``drop_last``): Lightning would end
    the run at step 0 with exit status 0, having trained nothing."""
    n = _get(cfg, "data.num_train", None)
    bs = _get(cfg, "data.batch_size", None)
    if n is None or bs is None:
        return
    need = int(bs) * world_size(cfg)
    if int(n) < need:
        raise ConfigError(f"data.num_train={n} is smaller than one batch (data.batch_size={bs} x {world_size(cfg)} "
                          f"process(es) = {need}): no training step could run; raise data.num_train or lower "
                          "data.batch_size")


def _check_global_batch(cfg) -> None:
    gbs = _get(cfg, "data.global_batch_size", None)
    if gbs is None:
        return
    gbs = int(gbs)
    ws = world_size(cfg)
    accum = int(_get(cfg, "trainer.accumulate_grad_batches", 1) or 1)
    if gbs <= 0 or gbs % (ws * accum):
        lo = max(1, gbs // (ws * accum)) * ws * accum
        raise ConfigError(f"data.global_batch_size={gbs} is not divisible by world size {ws} x "
                          f"accumulate_grad_batches {accum}; use e.g. {lo} or {lo + ws * accum}, or set the "
                          "per-device data.batch_size instead")
    per_device = gbs // (ws * accum)
    bs = _get(cfg, "data.batch_size", None)
    with open_dict(cfg.data):
        cfg.data.batch_size = per_device
    if bs is not None and int(bs) != per_device and os.environ.get("LOCAL_RANK") in (None, "0"):
        print(f"data.global_batch_size={gbs} over {ws} process(es) x {accum} accumulation: "
              f"per-device data.batch_size={per_device} (was {bs})")


def _check_teacher_path(cfg) -> None:
    t = cfg.get("teacher")
    if not isinstance(t, DictConfig) or "path_or_hub_id" not in t.keys():  # `in t` is False for ???
        return
    name = _get(cfg, "teacher.path_or_hub_id", None)
    if name is None:
        return  # loaders with a default location (e.g. the shapes teacher) check it themselves
    from ddstrans.teacher import TeacherLoadError, _looks_like_hub_id, check_directory
    from ddstrans.teacher.loading import REQUIRED

    local = Path(str(name)).expanduser()
    if local.is_dir():
        try:
            family, missing = check_directory(local)
        except TeacherLoadError as e:
            raise ConfigError(f"teacher.path_or_hub_id={name}: {e}") from None
        if missing:
            raise ConfigError(f"teacher.path_or_hub_id={name}: the directory lacks {', '.join(missing)} "
                              f"(a diffusers-format {family} teacher has {', '.join(REQUIRED[family])}"
                              + (" and optionally vae)" if family == "sd" else ")"))
    elif local.exists():
        raise ConfigError(f"teacher.path_or_hub_id={name} is a file; give the teacher's diffusers-format directory")
    elif not _looks_like_hub_id(str(name)):
        raise ConfigError(f"teacher.path_or_hub_id={name}: no such directory (and not a hub id like 'org/model')")


def _check_image_metrics(cfg) -> None:
    """``callbacks=real_metrics`` without a metric model, or a best checkpoint monitoring a metric none provides."""
    cb = (cfg.get("callbacks") or {}).get("image_metrics")
    if not isinstance(cb, DictConfig) or not str(cb.get("_target_", "")).endswith("ImageMetrics"):
        return
    given = {k: cb.get(k) for k in ("clip", "dino", "fid_features")}
    if not any(given.values()):
        raise ConfigError("callbacks.image_metrics has no metric model: set callbacks.image_metrics.clip=<CLIP dir or "
                          "hub id> and/or callbacks.image_metrics.dino=<DINO dir or hub id>")
    best = (cfg.get("callbacks") or {}).get("best_checkpoint")
    monitor = str(best.get("monitor") or "") if isinstance(best, DictConfig) else ""
    need = "clip" if monitor.startswith("val/clip_") else "dino" if monitor == "val/dino_structure" else None
    if need and not given[need]:
        raise ConfigError(f"callbacks.best_checkpoint.monitor={monitor} needs callbacks.image_metrics.{need}; set it or "
                          "monitor a metric that is computed (e.g. val/dino_structure with mode=min)")


def validate_config(cfg: DictConfig) -> None:
    """Cheap checks before the teacher is loaded; raises ``ConfigError``."""
    _check_tasks(cfg)
    _check_positive(cfg)
    _check_global_batch(cfg)
    _check_enough_data(cfg)
    _check_teacher_path(cfg)
    _check_image_metrics(cfg)
    from ddstrans.savers import check_config

    check_config(cfg, ConfigError, processes=world_size(cfg))  # LoRA rank, 8-bit optimizer library, FSDP, memory switches


def data_resolution(cfg) -> int | None:
    for key in ("data.resolution", "data.image_size"):
        v = _get(cfg, key, None)
        if v is not None:
            return int(v)
    return None


def validate_with_teacher(cfg: DictConfig, teacher) -> None:
    """Checks that need the loaded teacher; raises ``ConfigError``."""
    from ddstrans.savers import check_with_teacher

    check_with_teacher(cfg, teacher, ConfigError)  # LoRA target modules exist in its UNet
    f = int(getattr(teacher, "image_multiple", None) or getattr(teacher, "downsample_factor", 1) or 1)
    res = data_resolution(cfg)
    if res is not None and f > 1 and res % f:
        key = "data.resolution" if _get(cfg, "data.resolution", None) is not None else "data.image_size"
        lo = max(f, res // f * f)
        what = "VAE downsampling factor" if f == getattr(teacher, "downsample_factor", f) else "VAE factor x 2x2 packing"
        raise ConfigError(f"{key}={res} is not divisible by the teacher's {what} {f}; use {lo} or {lo + f}")
