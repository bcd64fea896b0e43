"""Evaluation on real images: any translator, per-image DDS/SDS editing, or precomputed outputs, scored with
``ddstrans.metrics``; a table of mean ± 95% CI per metric, a before/after grid and a trade-off plot.

A *row* is one (task, method[, sweep value]): its outputs for every input image, the metrics' summaries and
the time per image (the method's own work: translation or editing, not the metrics). Methods:

- ``identity``: the input itself (the floor of every "changed toward the target" metric);
- ``network``: the exported translator, one forward pass;
- ``dds`` / ``sds``: per-image editing with the teacher (``ddstrans.editing``, its ``EditConfig``);
- any name given precomputed outputs (e.g. ``instructpix2pix`` from a folder paired by file name).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ddstrans.metrics import SET_LEVEL, summarize

EDIT_METHODS = ("dds", "sds")


@dataclass
class Job:
    """One row to compute: ``method`` run for ``task`` (label: how the row is named in table and plot)."""

    task: object  # ddstrans.tasks.Task
    method: str
    label: str | None = None
    translator: object = None
    edit_config: dict = field(default_factory=dict)
    sweep: float | str | None = None


def prompts_for(task, captions: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """Per-image source and target prompts; a per-image task needs every image's caption."""
    if task.per_image and any(c is None for c in captions):
        raise ValueError(f"task {task.name!r} fills its prompts from each image's caption, but some inputs have none "
                         "(give NAME.txt beside each image, or shards with captions)")
    return [task.source_for(c) for c in captions], [task.target_for(c) for c in captions]


def run_method(job: Job, x: torch.Tensor, src: list[str], tgt: list[str], *, teacher=None,
               precomputed: dict | None = None, index: slice | None = None) -> torch.Tensor:
    """Outputs in [-1, 1] (CPU) of one method on a batch ``x`` in [-1, 1]."""
    from ddstrans.editing import EditConfig, edit_latents

    m = job.method
    if m == "identity":
        return x.clone()
    if precomputed is not None and m in precomputed:
        return precomputed[m][index].float() / 127.5 - 1.0
    if m == "network":
        tr = job.translator
        if tr is None:
            raise ValueError("method 'network' needs a translator")
        if tr.conditioning == "text":
            return torch.cat([tr.translate_tensor(x[i : i + 1], source=s, target=t).cpu()
                              for i, (s, t) in enumerate(zip(src, tgt))])
        return tr.translate_tensor(x, job.task.name).cpu()
    if m in EDIT_METHODS:
        if teacher is None:
            raise ValueError(f"method {m!r} needs the teacher")
        cfg = EditConfig(**{**job.edit_config, "method": m})
        z = teacher.encode_images(x.to(teacher.device))
        z = edit_latents(teacher, z, teacher.encode_prompts(src), teacher.encode_prompts(tgt), cfg)
        return teacher.decode_latents(z).float().cpu()
    raise ValueError(f"unknown method {m!r}: identity, network, dds, sds or a name given precomputed outputs")


def evaluate_jobs(inputs, jobs: Sequence[Job], metrics: dict, *, teacher=None, precomputed: dict | None = None,
                  masks: torch.Tensor | None = None, targets: Callable[[object], torch.Tensor | None] | None = None,
                  batch_size: int = 8, progress: bool = False, num_examples: int = 4,
                  examples: dict | None = None) -> list[dict]:
    """Run every job over ``inputs`` (an ``ImageSet``) and score it; returns one row per job.

    ``targets(task)`` gives the target-domain images (uint8) of a task for FID/KID; ``examples`` (a dict)
    receives ``examples[task] = [inputs, outputs of each job ...]`` (first ``num_examples``) for the grid."""
    from tqdm.auto import tqdm

    n = len(inputs)
    captions = inputs.captions
    device = next((p.device for m in metrics.values() for p in m.parameters()), torch.device("cpu"))
    rows, real_task = [], None
    prompts = {job.task.name: prompts_for(job.task, captions) for job in jobs}  # a missing caption fails first
    bar = tqdm(total=len(jobs) * n, desc="eval", unit="img", disable=not progress)
    for job in jobs:
        src, tgt = prompts[job.task.name]
        if any(k in metrics for k in SET_LEVEL) and real_task != job.task.name:
            real = targets(job.task) if targets else None
            if real is None or len(real) == 0:
                raise ValueError(f"fid/kid need target images (targets) for task {job.task.name!r}")
            for k in SET_LEVEL:
                if k in metrics:
                    metrics[k].clear_real()
                    for i in range(0, len(real), batch_size):
                        metrics[k].add_real((real[i : i + batch_size].float() / 127.5 - 1.0).to(device))
            real_task = job.task.name
        for m in metrics.values():
            m.reset()
        if job.method == "network" and job.translator is not None and job.translator.conditioning != "text":
            job.translator.translate_tensor(inputs.floats(slice(0, 1)), job.task.name)  # lazy init is not its cost
        seconds, shown = 0.0, []
        for i in range(0, n, batch_size):
            sl = slice(i, min(n, i + batch_size))
            x = inputs.floats(sl)
            start = time.perf_counter()
            y = run_method(job, x, src[sl], tgt[sl], teacher=teacher, precomputed=precomputed, index=sl)
            seconds += time.perf_counter() - start
            batch = {"inputs": x.to(device), "outputs": y.to(device), "source_prompts": src[sl],
                     "target_prompts": tgt[sl], "masks": None if masks is None else masks[sl].to(device)}
            for m in metrics.values():
                m.update_from(batch)
            if sum(len(s) for s in shown) < num_examples:
                shown.append(y[: num_examples - sum(len(s) for s in shown)])
            bar.update(sl.stop - sl.start)
        row = {"task": job.task.name, "method": job.label or job.method, "n": n, "ms_per_image": 1000 * seconds / n,
               "metrics": {k: summarize(m) for k, m in metrics.items()}}
        if job.sweep is not None:
            row["sweep"] = job.sweep
        rows.append(row)
        if examples is not None:
            examples.setdefault(job.task.name, [inputs.floats(slice(0, num_examples))]).append(torch.cat(shown))
    bar.close()
    return rows


def _cell(s: dict) -> str:
    if "value" in s:
        return f"{s['value']:.3f}"
    if s.get("mean") is None:
        return "undefined" + (f" ({s['undefined']})" if s.get("undefined") else "")
    spread = s.get("ci95") if "ci95" in s else s.get("std")
    text = f"{s['mean']:.4g}" + (f" ± {spread:.2g}" if spread is not None else "")
    return text + (f" ({s['undefined']} undefined)" if s.get("undefined") else "")


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (task, method), mean ± 95% CI per metric (KID: ± std over subsets)."""
    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    sweep = any("sweep" in r for r in rows)
    head = ["task", "method", *(["sweep"] if sweep else []), "n", *names, "ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["method"], *([str(r.get("sweep", ""))] if sweep else []), str(r["n"]),
                 *(_cell(r["metrics"][k]) if k in r["metrics"] else "" for k in names), f"{r['ms_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["mean ± 95% CI over images"]
    if "kid" in names:
        notes.append("kid: mean ± std over subsets")
    if any(r["metrics"].get(k, {}).get("undefined") for r in rows for k in names):
        notes.append("undefined: images whose CLIP direction is undefined (no image change), left out of the mean")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def examples_grid(examples: dict, min_side: int = 128):
    """Per task, one row per example: input | output of each job (upscaled to ``min_side`` px when smaller)."""
    from PIL import Image

    from ddstrans.images import image_grid, tensor_to_pil

    rows = []
    for parts in examples.values():
        for row in zip(*[tensor_to_pil(p) for p in parts]):
            s = max(1, -(-min_side // row[0].width))
            rows.append([im.resize((im.width * s, im.height * s), Image.NEAREST) if s > 1 else im for im in row])
    return image_grid(rows)


def _value(s: dict | None):
    if not s:
        return None
    return s.get("value", s.get("mean"))


def tradeoff_plot(rows: Sequence[dict], path, *, structure: str, similarity: str) -> None:
    """Structure kept (x) vs target similarity (y): one point per row, a line per (task, method) across sweep
    values, each point labeled; written as PNG (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the trade-off plot needs matplotlib (pip install 'ddstrans[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    groups: dict = {}
    for r in rows:
        x, y = _value(r["metrics"].get(structure)), _value(r["metrics"].get(similarity))
        if x is not None and y is not None:
            groups.setdefault((r["task"], r["method"]), []).append((x, y, r.get("sweep")))
    for (task, method), pts in groups.items():
        xs, ys, labels = zip(*pts)
        ax.plot(xs, ys, marker="o", label=f"{task} / {method}" if len({r['task'] for r in rows}) > 1 else method)
        for x, y, lab in pts:
            if lab is not None:
                ax.annotate(str(lab), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{structure} (structure: {'lower' if structure in ('dino_structure', 'lpips') else 'higher'} keeps more)")
    ax.set_ylabel(f"{similarity} (higher: closer to the target)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
