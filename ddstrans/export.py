"""Export a training checkpoint to a self-contained translator directory (see ``ddstrans.translator``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ddstrans.io_safety import is_no_space, swap_in_directory
from ddstrans.translator import FORMAT, FORMAT_VERSION, Translator, TranslatorLoadError, hash_tree


class ExportError(RuntimeError):
    pass


def load_training_checkpoint(path: str | Path, *, trust: bool = False) -> dict:
    """A Lightning checkpoint written by ``ddstrans-train``, read with ``torch.load(weights_only=True)``: tensors,
    containers and primitives only, so a planted checkpoint cannot run code. ``trust=True`` allows full
    unpickling of a file you trust that holds other objects."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # mmap: tensors stay on disk until read, so the optimizer state of a large checkpoint never enters memory
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as e:
        if trust:
            raise ExportError(f"{path}: cannot read checkpoint ({_first_line(e)})") from None
        raise ExportError(f"{path}: holds objects other than tensors and plain containers ({_first_line(e)}); "
                          "refusing to unpickle it. If you trust this file, load it with trust_checkpoint=True") from None
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: cannot read checkpoint ({_first_line(e)}); truncated or not a torch file?") from None
    if not isinstance(ckpt, dict) or "ddstrans" not in ckpt or "state_dict" not in ckpt:
        raise ExportError(f"{path}: not a ddstrans training checkpoint (no 'ddstrans' section)")
    return ckpt


def text_components(root: Path, family: str) -> list[str]:
    """The text encoder and tokenizer folders a text-conditioned translator of ``family`` needs."""
    if family == "sd":
        return ["text_encoder", "tokenizer"]
    return sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith(("text_encoder", "tokenizer")))


def copy_text_components(root: Path, out: Path, names: list[str]) -> None:
    """Re-save the teacher's text encoders (safetensors) and tokenizers into ``out`` (with ``model_index.json`` for
    families encoded through their pipeline)."""
    import transformers
    from transformers import AutoTokenizer

    for name in names:
        if name.startswith("tokenizer"):
            AutoTokenizer.from_pretrained(root / name).save_pretrained(out / name)
        else:
            arch = json.loads((root / name / "config.json").read_text()).get("architectures") or ["CLIPTextModel"]
            getattr(transformers, arch[0]).from_pretrained(root / name).save_pretrained(out / name)
    if (root / "model_index.json").is_file() and len(names) > 2:
        shutil.copyfile(root / "model_index.json", out / "model_index.json")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def generator_from_checkpoint(ckpt: dict, use_ema: bool = True, teacher_root: str | Path | None = None,
                              merge: bool = True):
    """Rebuild the ``TranslationUNet`` of a checkpoint, with EMA weights when ``use_ema`` (and available).

    A LoRA generator's checkpoint holds only the adapters: it is rebuilt on the teacher's UNet (read from
    ``teacher_root``, default: the directory recorded in the checkpoint) and merged into a ``TranslationUNet``
    (``merge=False``: returned as the LoRA generator, with ``base_sha256``, the hash of the UNet it adapts)."""
    from ddstrans.generator import TranslationUNet

    payload = ckpt["ddstrans"]
    lora = payload.get("generator_class") == "LoRATeacherGenerator"
    if lora:
        from ddstrans.lora import lora_generator_from_config
        from ddstrans.lora_export import unet_sha256

        unet = _teacher_unet(payload, teacher_root)
        base_sha256 = None if merge else unet_sha256(unet)  # of the plain UNet, before the adapters go in
        gen = lora_generator_from_config(unet, payload["generator_config"])
        gen.base_sha256 = base_sha256
    else:
        gen = TranslationUNet.from_config(payload["generator_config"])
    sd = {k[len("generator."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    gen.load_state_dict(sd)
    used_ema = False
    if use_ema:
        ema = ckpt.get("ema")
        if ema is None:
            raise ExportError("the checkpoint has no EMA weights (trained with optim.ema.enabled=false); export with use_ema=False")
        params = [p for _, p in gen.trainable_named_parameters()] if lora else list(gen.parameters())
        shadow = ema["shadow_params"]
        if len(shadow) != len(params):
            raise ExportError(f"EMA has {len(shadow)} tensors but the generator {len(params)}")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
        used_ema = True
    if lora and merge:
        from ddstrans.lora import merge_to_translation_unet

        try:
            gen = merge_to_translation_unet(gen, in_place=True)  # one copy of the UNet in memory
        except ValueError as e:
            raise ExportError(str(e)) from None
    return gen.eval(), used_ema


def _teacher_unet(payload: dict, teacher_root: str | Path | None):
    """The teacher's UNet (float32) from ``teacher_root`` or the directory the checkpoint records."""
    from diffusers import UNet2DConditionModel

    root = teacher_root or payload["teacher"].get("root")
    if root is None or not (Path(root) / "unet").is_dir():
        raise ExportError(f"a LoRA checkpoint holds only the adapters; the teacher directory {str(root)!r} (recorded "
                          "in the checkpoint) has no unet/: give teacher_path, the teacher's diffusers directory")
    return UNet2DConditionModel.from_pretrained(Path(root), subfolder="unet", torch_dtype=torch.float32)


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    use_ema: bool = True,
    copy_teacher: bool = True,
    teacher_path: str | Path | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    onnx: bool = False,
    license: str | None = None,
    examples: list | Callable[[dict | None], list] | None = None,
    merge_adapters: bool = True,
) -> Path:
    """Write the translator directory; returns its path.

    ``copy_teacher``: copy the VAE (and, for text conditioning, text encoder + tokenizer) into the directory;
    otherwise reference the teacher directory by absolute path. ``teacher_path`` overrides the teacher
    location recorded in the checkpoint (e.g. when it moved). ``onnx``: also write ``onnx/`` (see
    ``ddstrans.onnx_export``). ``license``: the model card's license (default: the teacher card's, else "other").
    ``examples``: PIL images for ``examples/`` and the card's before/after grid, or a function of the run config
    that returns them (the CLI passes ``ddstrans.shapes.examples.examples_for_run``). ``merge_adapters=False`` (LoRA
    checkpoints): write only the adapters and conditioning tensors and reference the teacher's UNet by directory,
    hub id and weight hash instead of folding the adapters into a copy of it (``ddstrans.lora_export``).

    The directory is built in a temporary sibling folder, verified, and swapped in whole (under a lock file), so
    a crash or a second export never leaves a half-written translator at ``out_dir``."""
    from ddstrans.locks import LockedError, directory_lock

    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = directory_lock(out, what=f"export target {out}")
    try:
        lock.acquire()
    except LockedError as e:
        raise ExportError(f"{e}: another export to the same directory is running") from None
    try:
        _check_target(out, overwrite)  # again, now that no other export can change it
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        try:
            _build(ckpt_path, tmp, use_ema=use_ema, copy_teacher=copy_teacher, teacher_path=teacher_path,
                   trust_checkpoint=trust_checkpoint, onnx=onnx, license=license, examples=examples,
                   merge_adapters=merge_adapters)
            swap_in_directory(tmp, out)
        except OSError as e:
            if is_no_space(e):
                raise ExportError(f"no space left on {out.parent} while exporting; {out} is unchanged") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    """An absent or empty directory is written; a translator directory only with ``overwrite``; anything else
    (a file, a folder of other things) never: ``overwrite`` must not delete what it was not meant for."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a directory; refusing to replace it")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "translator.json").is_file():
        raise ExportError(f"{out} is not empty and not a translator directory (no translator.json); refusing to "
                          "replace it (with or without overwrite=True): choose another output directory")
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty; overwrite=True replaces it")


def _build(ckpt_path, tmp: Path, *, use_ema: bool, copy_teacher: bool, teacher_path, trust_checkpoint: bool,
           onnx: bool = False, license: str | None = None, examples=None, merge_adapters: bool = True) -> None:
    """Write a complete translator into the empty directory ``tmp`` and verify it as a loader would."""
    from ddstrans.tasks import TaskTable

    ckpt = load_training_checkpoint(ckpt_path, trust=trust_checkpoint)
    payload = ckpt["ddstrans"]
    teacher = payload["teacher"]
    if not merge_adapters:
        if payload.get("generator_class") != "LoRATeacherGenerator":
            raise ExportError(f"merge_adapters=False needs a LoRA checkpoint (generator=lora_from_teacher); this one "
                              f"trained a {payload.get('generator_class') or 'TranslationUNet'}")
        if onnx:
            raise ExportError("onnx=True and merge_adapters=False exclude each other (the ONNX graph holds the whole network)")
    root = Path(teacher_path) if teacher_path else (Path(teacher["root"]) if teacher.get("root") else None)
    gen, used_ema = generator_from_checkpoint(ckpt, use_ema, root, merge=merge_adapters)
    adapters = None
    if not merge_adapters:
        from ddstrans.lora import merge_to_translation_unet
        from ddstrans.lora_export import base_reference, write_adapters

        write_adapters(gen, tmp)
        adapters = {"base": base_reference(root, teacher.get("source"), gen.base_sha256)}
        try:  # the merged network for the examples and the card (one UNet copy: folded in place)
            gen = merge_to_translation_unet(gen, in_place=True)
        except ValueError as e:
            raise ExportError(str(e)) from None
    table = TaskTable.from_parts(payload["tasks"], payload["task_tensors"])
    conditioning = gen.config.conditioning
    family = teacher.get("family", "sd")
    texts = (text_components(root, family) if conditioning == "text" and root is not None and root.is_dir()
             else ["text_encoder", "tokenizer"])
    needs = (["vae"] if teacher.get("has_vae") else []) + (texts if conditioning == "text" else [])
    if needs and (root is None or not all((root / n).is_dir() for n in needs)):
        raise ExportError(f"teacher directory {str(root)!r} (recorded in the checkpoint) lacks {', '.join(needs)}; "
                          "give teacher_path, the teacher's diffusers directory")

    if adapters is None:
        gen.save_pretrained(tmp / "generator", safe_serialization=True)
    table.save(tmp / "tasks.safetensors")
    if copy_teacher and needs:
        if teacher.get("has_vae"):
            from diffusers import AutoencoderKL

            AutoencoderKL.from_pretrained(root, subfolder="vae").save_pretrained(tmp / "vae", safe_serialization=True)
        if conditioning == "text":
            copy_text_components(root, tmp, texts)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if adapters else 1,
        "conditioning": conditioning,
        "resolution": int(teacher["image_size"]),
        "latent_channels": int(teacher["latent_channels"]),
        "downsample_factor": int(teacher["downsample_factor"]),
        "latent_scale": float(teacher["latent_scale"]),
        "latent_shift": float(teacher.get("latent_shift", 0.0)),
        "has_vae": bool(teacher.get("has_vae")),
        "teacher": {"source": teacher.get("source"), "prediction_type": teacher.get("prediction_type"),
                    "family": family},
        "teacher_reference": None if copy_teacher or not needs else str(root.resolve()),
        "weights": "ema" if used_ema else "raw",
        **({"adapters": adapters} if adapters else {}),
        "tasks": table.to_dict()["tasks"],
        "training": {"global_step": ckpt.get("global_step"), "metrics": payload.get("metrics", {}),
                     "checkpoint": str(Path(ckpt_path).resolve())},
    }
    _write_extras(tmp, gen, table, info, payload.get("run_config"), root, onnx=onnx, license=license,
                  examples=examples)
    info["files"] = hash_tree(tmp)
    (tmp / "translator.json").write_text(json.dumps(info, indent=2))
    try:  # verify as a user would load it: hashes, then every component
        Translator.from_pretrained(tmp, base=root if adapters else None)
    except TranslatorLoadError as e:
        raise ExportError(f"the export did not verify ({e})") from None


def _write_extras(tmp: Path, gen, table, info: dict, run_config, teacher_root, *, onnx: bool, license, examples) -> None:
    """ONNX files, example images and the model card of the directory being built (before it is hashed)."""
    from ddstrans import model_card

    vae = None
    if info["has_vae"]:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(tmp / "vae" if (tmp / "vae").is_dir() else Path(teacher_root) / "vae")
    if onnx:
        from ddstrans.onnx_export import write_onnx

        emb = tuple(table.source.shape[-2:]) if info["conditioning"] == "text" else None
        info["onnx"] = write_onnx(tmp, gen, vae, resolution=info["resolution"],
                                  downsample_factor=info["downsample_factor"], cross_attention_shape=emb)
    if callable(examples):
        examples = examples(run_config)
    has_example = model_card.write_examples(tmp, Translator(gen, table, info, vae=vae), examples or [])
    lic = license or model_card.teacher_license(teacher_root)
    (tmp / "README.md").write_text(model_card.render_card(info, run_config, license=lic, has_example=has_example))
