"""Export a training checkpoint to a self-contained translator directory (see ``ddstrans.translator``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
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


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def generator_from_checkpoint(ckpt: dict, use_ema: bool = True):
    """Rebuild the ``TranslationUNet`` of a checkpoint, with EMA weights when ``use_ema`` (and available)."""
    from ddstrans.generator import TranslationUNet

    payload = ckpt["ddstrans"]
    gen = TranslationUNet.from_config(payload["generator_config"])
    sd = {k[len("generator."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    gen.load_state_dict(sd)
    used_ema = False
    if use_ema:
        ema = ckpt.get("ema")
        if ema is None:
            raise ExportError("the checkpoint has no EMA weights (trained with optim.ema.enabled=false); export with use_ema=False")
        params = list(gen.parameters())
        shadow = ema["shadow_params"]
        if len(shadow) != len(params):
            raise ExportError(f"EMA has {len(shadow)} tensors but the generator {len(params)}")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
        used_ema = True
    return gen.eval(), used_ema


def _model_card(info: dict, run_config: dict | None) -> str:
    import yaml

    rows = "\n".join(
        f"| `{t['name']}` | {' / '.join(t['source'])} | {' / '.join(t['target'])} |" for t in info["tasks"])
    metrics = info.get("training", {}).get("metrics", {})
    metric_lines = "\n".join(f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())) or "- (none recorded)"
    first = info["tasks"][0]["name"]
    text_usage = ""
    if info["conditioning"] == "text":
        text_usage = '\nimages = tr(pil_images, source="a photo of a cat", target="a photo of a fox")  # new prompt pair\n'
    cfg_yaml = yaml.safe_dump(run_config or {}, sort_keys=False, default_flow_style=False) if run_config else "{}\n"
    return f"""# ddstrans translator

Single-pass image translation network trained with Delta Denoising Score (DDS) against a frozen
text-to-image diffusion teacher (`{info['teacher'].get('source')}`).

- conditioning: **{info['conditioning']}**
- resolution: {info['resolution']} px (latents {info['latent_channels']} x {info['resolution'] // info['downsample_factor']}^2)
- weights: {info['weights']} (training step {info.get('training', {}).get('global_step')})

## Tasks

| task | source prompts | target prompts |
|---|---|---|
{rows}

## Metrics at export

{metric_lines}

## Usage

```python
import ddstrans
from PIL import Image

tr = ddstrans.Translator.from_pretrained("path/to/this/dir")
print(tr.tasks)
images = tr([Image.open("cat.jpg")], task="{first}")   # one generator forward pass per batch
{text_usage}```

```bash
ddstrans translate path/to/this/dir --task {first} photos/*.jpg -o translated/
```

Files are safetensors + JSON; `translator.json` lists the sha256 of every file and loading refuses tampered files.

## Training configuration

```yaml
{cfg_yaml}```
"""


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    use_ema: bool = True,
    copy_teacher: bool = True,
    teacher_path: str | Path | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the translator directory; returns its path.

    ``copy_teacher``: copy the VAE (and, for text conditioning, text encoder + tokenizer) into the directory;
    otherwise reference the teacher directory by absolute path. ``teacher_path`` overrides the teacher
    location recorded in the checkpoint (e.g. when it moved)."""
    from ddstrans.locks import LockedError, LockFile

    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = LockFile(out.with_name(f".{out.name}.lock"), what=f"export target {out}")
    try:
        lock.acquire()
    except LockedError as e:
        raise ExportError(f"{e}: another export to the same directory is running") from None
    try:
        _check_target(out, overwrite)  # again, now that no other export can change it
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        try:
            _build(ckpt_path, tmp, use_ema=use_ema, copy_teacher=copy_teacher, teacher_path=teacher_path,
                   trust_checkpoint=trust_checkpoint)
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


def _build(ckpt_path, tmp: Path, *, use_ema: bool, copy_teacher: bool, teacher_path, trust_checkpoint: bool) -> None:
    """Write a complete translator into the empty directory ``tmp`` and verify it as a loader would."""
    from ddstrans.tasks import TaskTable

    ckpt = load_training_checkpoint(ckpt_path, trust=trust_checkpoint)
    payload = ckpt["ddstrans"]
    gen, used_ema = generator_from_checkpoint(ckpt, use_ema)
    table = TaskTable.from_parts(payload["tasks"], payload["task_tensors"])
    teacher = payload["teacher"]
    conditioning = gen.config.conditioning
    root = Path(teacher_path) if teacher_path else (Path(teacher["root"]) if teacher.get("root") else None)
    needs = (["vae"] if teacher.get("has_vae") else []) + (["text_encoder", "tokenizer"] if conditioning == "text" else [])
    if needs and (root is None or not all((root / n).is_dir() for n in needs)):
        raise ExportError(f"teacher directory {str(root)!r} (recorded in the checkpoint) lacks {', '.join(needs)}; "
                          "give teacher_path, the teacher's diffusers directory")

    gen.save_pretrained(tmp / "generator", safe_serialization=True)
    table.save(tmp / "tasks.safetensors")
    if copy_teacher and needs:
        if teacher.get("has_vae"):
            from diffusers import AutoencoderKL

            AutoencoderKL.from_pretrained(root, subfolder="vae").save_pretrained(tmp / "vae", safe_serialization=True)
        if conditioning == "text":
            from transformers import AutoTokenizer, CLIPTextModel

            CLIPTextModel.from_pretrained(root, subfolder="text_encoder").save_pretrained(tmp / "text_encoder")
            AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(tmp / "tokenizer")
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "conditioning": conditioning,
        "resolution": int(teacher["image_size"]),
        "latent_channels": int(teacher["latent_channels"]),
        "downsample_factor": int(teacher["downsample_factor"]),
        "latent_scale": float(teacher["latent_scale"]),
        "has_vae": bool(teacher.get("has_vae")),
        "teacher": {"source": teacher.get("source"), "prediction_type": teacher.get("prediction_type")},
        "teacher_reference": None if copy_teacher or not needs else str(root.resolve()),
        "weights": "ema" if used_ema else "raw",
        "tasks": table.to_dict()["tasks"],
        "training": {"global_step": ckpt.get("global_step"), "metrics": payload.get("metrics", {}),
                     "checkpoint": str(Path(ckpt_path).resolve())},
    }
    (tmp / "README.md").write_text(_model_card(info, payload.get("run_config")))
    info["files"] = hash_tree(tmp)
    (tmp / "translator.json").write_text(json.dumps(info, indent=2))
    try:  # verify as a user would load it: hashes, then every component
        Translator.from_pretrained(tmp)
    except TranslatorLoadError as e:
        raise ExportError(f"the export did not verify ({e})") from None
