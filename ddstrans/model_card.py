"""The exported translator's ``README.md``: a model card the Hugging Face Hub reads (YAML front matter) and a
person can use (tasks, example, how it was trained, how well it does, how to run it).

Why a module of its own: the card is written at export (``ddstrans.export``) and rewritten when evaluation
metrics arrive later (``ddstrans card DIR --eval eval.json``: ``ddstrans eval`` runs after export), and both
must produce the same document. Example images (``examples/``) are written at export: the inputs the demo offers
and a before/after grid the card shows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EVAL_BEGIN, EVAL_END = "<!-- ddstrans:eval -->", "<!-- /ddstrans:eval -->"
EXAMPLES_DIR = "examples"
BEFORE_AFTER = f"{EXAMPLES_DIR}/before_after.png"
TAGS = ["ddstrans", "image-to-image", "image-translation", "delta-denoising-score", "diffusion-distillation"]


def _get(cfg: Mapping | None, dotted: str):
    cur = cfg
    for k in dotted.split("."):
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


def teacher_license(teacher_dir: str | Path | None) -> str | None:
    """The ``license`` of the teacher's own model card front matter, if it has one."""
    if not teacher_dir:
        return None
    card = Path(teacher_dir) / "README.md"
    if not card.is_file():
        return None
    front = _front_matter(card.read_text())
    return str(front["license"]) if front.get("license") else None


def _front_matter(text: str) -> dict:
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# settings that mean nothing without another: left out of the summary when that one is unset
_ONLY_WITH = {
    "loss.t_range_mix": ("loss.t_range_mix_prob", "loss.t_range_mix_from_step"),  # the second band's share, start
    "loss.anchor_weight_phases": ("loss.anchor_tasks",),  # the anchor term's tasks
}


def training_summary(run_config: Mapping | None) -> list[tuple[str, object]]:
    """The settings a reader needs to judge the training, from the resolved run config (absent ones left out)."""
    keys = [
        ("steps", "trainer.max_steps"), ("batch size (per device)", "data.batch_size"), ("data", "data._target_"),
        ("loss", "loss.method"), ("learning rate", "optim.lr"), ("EMA decay", "optim.ema.decay"), ("guidance", "loss.guidance"),
        ("guidance warm-up steps", "loss.warmup_steps"), ("timestep range at the end of its anneal", "loss.t_range_end"),
        ("timestep range of the last phase", "loss.t_range_late"), ("timestep range phases", "loss.t_range_phases"),
        ("second timestep band", "loss.t_range_mix"), ("share of samples in the second band", "loss.t_range_mix_prob"),
        ("second band from step", "loss.t_range_mix_from_step"),
        ("learning-rate milestones", "optim.scheduler.milestones"),
        ("batches per optimizer step from a step", "callbacks.step_grad_accumulation.scheduling"),
        ("identity weight", "loss.identity_weight"), ("identity weight from a step", "loss.identity_weight_phases"),
        ("anchor weight from a step", "loss.anchor_weight_phases"), ("anchor tasks", "loss.anchor_tasks"),
        ("generator blocks", "generator.block_out_channels"),
        ("generator conditioning", "generator.conditioning"), ("seed", "seed"),
    ]
    unused = {key for owner, dependents in _ONLY_WITH.items() if _get(run_config, owner) is None for key in dependents}
    keys = [(label, key) for label, key in keys if key not in unused]
    return [(label, v) for label, key in keys if (v := _get(run_config, key)) is not None]


def eval_table(rows: Sequence[Mapping]) -> str:
    """``ddstrans eval --json`` rows as a markdown table (every column the rows have, in their order)."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _target_cell(task: Mapping) -> str:
    """Target prompts; a per-image task's rewrite as ``pattern -> replacement``."""
    text = _cell(" / ".join(task["target"]))
    from ddstrans.tasks import as_tasks

    for r in as_tasks([task])[0].rewrites:
        text += f", rewritten: `{_cell(r['pattern'])}` → `{_cell(r['replacement'])}`"
    return text


def _eval_section(rows: Sequence[Mapping] | None) -> str:
    body = (eval_table(rows) + "\n\nMeasured with `ddstrans eval` on held-out inputs.") if rows else (
        "Not evaluated yet: `ddstrans eval DIR --json eval.json`, then `ddstrans card DIR --eval eval.json` "
        "writes the table here.")
    return f"{EVAL_BEGIN}\n## Evaluation\n\n{body}\n{EVAL_END}"


def render_card(info: Mapping, run_config: Mapping | None = None, *, license: str | None = None,
                eval_rows: Sequence[Mapping] | None = None, has_example: bool = False) -> str:
    """The whole README.md of a translator directory."""
    import yaml

    teacher = info.get("teacher", {}).get("source") or "unknown"
    tasks = info["tasks"]
    first = tasks[0]["name"]
    front = {"library_name": "ddstrans", "license": license or "other"}
    if _HUB_ID.match(teacher):  # a local teacher directory is no hub model: named in the text only
        front["base_model"] = teacher
    front.update(pipeline_tag="image-to-image", tags=TAGS + [f"task:{t['name']}" for t in tasks][:20])
    rows = "\n".join(f"| `{t['name']}` | {_cell(' / '.join(t['source']))} | {_target_cell(t)} |" for t in tasks)
    metrics = info.get("training", {}).get("metrics", {})
    metric_lines = "\n".join(f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())
                             if isinstance(v, (int, float))) or "- (none recorded)"
    summary = "\n".join(f"| {k} | `{v}` |" for k, v in training_summary(run_config))
    summary = f"| setting | value |\n|---|---|\n{summary}" if summary else "(no run configuration recorded)"
    text_usage = ""
    if info["conditioning"] == "text":
        text_usage = 'images = tr(pil_images, source="a photo of a cat", target="a photo of a fox")  # a new prompt pair\n'
    example = (f"\n## Example\n\n![before and after]({BEFORE_AFTER})\n\nEach row: an input of `{EXAMPLES_DIR}/`, then "
               f"its translation by each task ({', '.join(t['name'] for t in tasks[:8])}).\n") if has_example else ""
    license_note = "" if license else ("\nThe license is not set (`other`): give it with `ddstrans export --license` "
                                       "(a translator inherits the terms of its teacher).\n")
    cfg_yaml = yaml.safe_dump(dict(run_config), sort_keys=False) if run_config else "{}\n"
    return f"""---
{yaml.safe_dump(front, sort_keys=False)}---

# ddstrans translator

Single-pass image translation network trained with Delta Denoising Score (DDS) against the frozen
text-to-image diffusion teacher `{teacher}`: one forward pass per image.

- conditioning: **{info['conditioning']}**
- resolution: {info['resolution']} px (latents {info['latent_channels']} x {info['resolution'] // info['downsample_factor']}^2)
- weights: {info['weights']} (training step {info.get('training', {}).get('global_step')})
{license_note}{example}
## Tasks

| task | source prompts | target prompts |
|---|---|---|
{rows}

## Training

{summary}

{_eval_section(eval_rows)}

## Metrics at export

{metric_lines}

## Usage

```python
import ddstrans
from PIL import Image

tr = ddstrans.Translator.from_pretrained("path/to/this/dir")   # or "org/name" on the hub
print(tr.tasks)
images = tr([Image.open("cat.jpg")], task="{first}")   # one generator forward pass per batch
{text_usage}```

```bash
ddstrans translate path/to/this/dir --task {first} photos/ -o translated/
ddstrans demo path/to/this/dir        # a web page on http://127.0.0.1:7860 (pip install "ddstrans[demo]")
```

Files are safetensors, JSON (and ONNX under `onnx/` when exported with `--onnx`; load with
`Translator.from_pretrained(dir, backend="onnx")`). `translator.json` lists the sha256 of every file and loading
refuses tampered files.

## Training configuration

<details><summary>resolved run configuration</summary>

```yaml
{cfg_yaml}```

</details>
"""


# ---------------------------------------------------------------------- examples
def write_examples(root: str | Path, translator, images: Sequence, scale: int | None = None) -> bool:
    """Save ``images`` as ``examples/example_<i>.png`` and a before/after grid (input, then each task's output)
    as ``examples/before_after.png``. Returns whether anything was written."""
    from PIL import Image

    from ddstrans.images import image_grid, to_rgb

    if not images:
        return False
    root = Path(root)
    (root / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    images = [to_rgb(im) for im in images]
    for i, im in enumerate(images):
        im.save(root / EXAMPLES_DIR / f"example_{i}.png")
    tasks = translator.tasks[:8]
    outs = [translator(images, task=t) for t in tasks]
    side = max(max(im.size) for im in images)
    scale = scale or max(1, 128 // side)
    rows = [[im, *(o[i] for o in outs)] for i, im in enumerate(images)]
    rows = [[x.resize((x.width * scale, x.height * scale), Image.NEAREST) for x in row] for row in rows]
    image_grid(rows).save(root / BEFORE_AFTER)
    return True


# ---------------------------------------------------------------------- rewriting the card of an export
def update_card_eval(root: str | Path, eval_rows: Sequence[Mapping]) -> Path:
    """Write ``eval_rows`` into the card's evaluation section and the card's new sha256 into translator.json.

    Both files change together or not at all: the directory is rebuilt beside itself (the unchanged files hard-
    linked, copied where links are not possible), the new card and translator.json written there, the result
    verified, and swapped in whole (``ddstrans.io_safety.swap_in_directory``) under the export lock of the
    directory. A crash leaves the old directory, never a card whose hash translator.json does not list."""
    import shutil
    import tempfile

    from ddstrans.io_safety import swap_in_directory
    from ddstrans.locks import LockedError, directory_lock
    from ddstrans.translator import TranslatorLoadError, hash_tree, verify_tree

    given = Path(root)
    root = given.resolve()  # a link to the directory: the directory itself is rebuilt, the link kept
    meta_path, card = root / "translator.json", root / "README.md"
    if not meta_path.is_file() or not card.is_file():
        raise TranslatorLoadError(f"{given}: not an exported translator (translator.json and README.md needed)")
    lock = directory_lock(root, what=f"translator directory {root}")
    try:
        lock.acquire()
    except LockedError as e:
        raise TranslatorLoadError(f"{e}: an export or another card update of the same directory is running") from None
    try:
        info = json.loads(meta_path.read_text())
        files = info.get("files", {})
        verify_tree(root, files)  # never re-sign a tampered directory
        text = card.read_text()
        if EVAL_BEGIN not in text or EVAL_END not in text:
            raise TranslatorLoadError(f"{card}: has no evaluation section (exported by an older ddstrans; re-export it)")
        head, rest = text.split(EVAL_BEGIN, 1)
        tail = rest.split(EVAL_END, 1)[1]
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.card-{os.getpid()}-"))
        try:
            for rel in files:
                if rel == "README.md":
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(root / rel, tmp / rel)
                except OSError:
                    shutil.copy2(root / rel, tmp / rel)
            (tmp / "README.md").write_text(head + _eval_section(list(eval_rows)) + tail)
            new_files = hash_tree(tmp)
            if set(new_files) != set(files) or any(new_files[r] != files[r] for r in files if r != "README.md"):
                raise TranslatorLoadError(f"{root}: changed while its card was being rewritten; nothing was changed")
            info["files"] = {r: new_files[r] for r in files}
            with open(tmp / "translator.json", "w") as f:
                f.write(json.dumps(info, indent=2))
                f.flush()
                os.fsync(f.fileno())
            swap_in_directory(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return given / "README.md"
