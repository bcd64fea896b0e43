"""Shapes-world evaluation: identity, the exported network, per-image DDS and SDS editing, per task.

``routed`` is the network reaching each input's prompt pair through its trained caption rewrites, one forward pass
per step (``Translator.route``; text-conditioned translators).

Inputs are rendered from held-out seeds (never used in training); an input whose caption the task would
not change (already at the target) is skipped, so identity scores 0 target accuracy. Metrics come from
the renderer's ground truth (``ddstrans.shapes.metrics``): target accuracy (shapes read by the strict reader, so
a pincushion or blob is no square), mask IoU against the target's ground-truth mask (the target square's for
``to_square``), "kept PSNR" of what the task must leave alone (the background outside the source and
target masks; the shape itself for background tasks), diversity, and time per image.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddstrans.shapes import metrics as M
from ddstrans.shapes import seeds as S
from ddstrans.shapes.world import all_captions, parse_caption, render_scene, to_model

METHODS = ("identity", "answer", "network", "routed", "dds", "sds")
DEFAULT_METHODS = ("identity", "network", "dds", "sds")  # "answer" (the renderer's ground truth) on request
METRIC_KEYS = ("target_acc", "mask_iou", "keep_psnr", "diversity", "ms_per_image")


@dataclass
class EvalSet:
    """Held-out inputs of one task with their ground truth."""

    task: str
    attribute: str
    seeds: list[int]
    inputs: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    src_masks: np.ndarray
    tgt_masks: np.ndarray
    targets: list[str]
    src_captions: list[str]
    tgt_captions: list[str]
    answers: torch.Tensor  # (N, 3, H, W) in [-1, 1]: the same scenes rendered with the target attribute


def differing_attributes(src_caption: str, tgt_caption: str) -> tuple[str, ...]:
    """The attributes two captions name differently, in caption order (color, shape, background)."""
    a, b = parse_caption(src_caption), parse_caption(tgt_caption)
    return tuple(k for k in a if a[k] != b[k])


def changed_attributes(task, caption: str) -> tuple[str, ...]:
    """The attributes ``task`` changes in a scene with ``caption``, in caption order (color, shape, background)."""
    return differing_attributes(task.source_for(caption), task.target_for(caption))


def task_attributes(task) -> tuple[str, ...]:
    """Every attribute ``task`` changes where it changes the most (``("color", "shape")`` for ``to_blue+to_square``).

    An evaluation input must change all of them: a blue circle is no input of ``to_blue+to_square``, whose
    accuracy is that of both changes at once. ValueError when the task changes unrelated attribute sets on
    different scenes (there is then no one thing to score)."""
    sets = {changed_attributes(task, c) for c in all_captions()} - {()}
    if not sets:
        raise ValueError(f"task {task.name!r} changes no scene of the shapes world")
    full = max(sets, key=len)
    if any(not set(s) <= set(full) for s in sets):
        raise ValueError(f"task {task.name!r} changes different attributes on different scenes: {sorted(sets)}")
    return full


def build_eval_set(task, n: int, start_seed: int | None = None, max_tries: int = 100_000,
                   seed_range: range = S.HELD_OUT) -> EvalSet:
    """``n`` held-out scenes that ``task`` changes in all of :func:`task_attributes` (one attribute for the
    world's single edits; ``attribute`` is then e.g. ``"color"``, for a composition ``"color+shape"`` with targets
    like ``"blue+square"``). ``seed_range``: where the scenes must come from (``seeds.TRANSLATOR_TRAIN`` gives a
    translator's training scenes, for probes of what it was trained on; ``start_seed``, default the range's first
    seed, then in that range)."""
    if start_seed is None:
        start_seed = seed_range.start
    attrs = task_attributes(task)
    seeds, images, src_m, tgt_m, answers, targets, srcs, tgts = [], [], [], [], [], [], [], []
    seed = start_seed
    while len(seeds) < n:
        if seed not in seed_range:
            name = next((f"seeds.{k.upper()}" for k, r in S.RANGES.items() if r == seed_range), str(seed_range))
            raise ValueError(f"task {task.name!r}: start_seed {start_seed} leaves seed_range {name} before {n} inputs")
        if seed - start_seed > max_tries:
            raise ValueError(f"task {task.name!r}: found only {len(seeds)} of {n} scenes it changes")
        scene = render_scene(seed)
        src_caption, tgt_caption = task.source_for(scene["caption"]), task.target_for(scene["caption"])
        if differing_attributes(src_caption, tgt_caption) == attrs:
            b = parse_caption(tgt_caption)
            seeds.append(seed)
            images.append(scene["image"])
            src_m.append(scene["mask"])
            answer = render_scene(seed, **{a: b[a] for a in attrs})
            tgt_m.append(answer["mask"])
            answers.append(answer["image"])
            targets.append("+".join(b[a] for a in attrs))
            srcs.append(src_caption)
            tgts.append(tgt_caption)
        seed += 1
    return EvalSet(task.name, "+".join(attrs), seeds, to_model(np.stack(images)), np.stack(src_m), np.stack(tgt_m),
                   targets, srcs, tgts, to_model(np.stack(answers)))


def _batches(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def run_method(method: str, es: EvalSet, *, translator=None, teacher=None, edit_config=None,
               batch_size: int = 64, init: torch.Tensor | None = None,
               progress: bool = False) -> tuple[torch.Tensor, float]:
    """Outputs (N, 3, H, W) in [-1, 1] of one method on an eval set, and seconds per image. ``init`` (images like the
    inputs): where a per-image edit (dds, sds) starts instead of the input, e.g. a translator's outputs — is its answer
    the score's fixed point? The source branch still sees the input. ``progress``: a bar over the batches (per-image
    editing of hundreds of inputs takes many minutes on a CPU)."""
    from tqdm.auto import tqdm

    from ddstrans.editing import EditConfig, edit_latents

    if method == "network" and translator is not None and translator.conditioning != "text":
        translator.translate_tensor(es.inputs[:1], es.task)  # warm-up: lazy initialisation is not the method's cost
    start = time.perf_counter()
    outs = []
    for sl in tqdm(list(_batches(len(es.seeds), batch_size)), desc=method, disable=not progress):
        x = es.inputs[sl]
        if method == "identity":
            outs.append(x.clone())
        elif method == "answer":  # what a perfect translation scores (e.g. the diversity it keeps)
            outs.append(es.answers[sl].clone())
        elif method in ("network", "routed"):
            if translator is None:
                raise ValueError(f"method {method!r} needs an exported translator")
            if translator.conditioning == "text" or method == "routed":  # a task-id translator refuses route=True
                outs.append(torch.cat([
                    translator.translate_tensor(x[i : i + 1], source=s, target=t, route=method == "routed")
                    for i, (s, t) in enumerate(zip(es.src_captions[sl], es.tgt_captions[sl]))
                ]).cpu())
            else:
                outs.append(translator.translate_tensor(x, es.task).cpu())
        elif method in ("dds", "sds"):
            if teacher is None:
                raise ValueError(f"method {method!r} needs the teacher")
            cfg = EditConfig(**{**(edit_config or {}), "method": method})
            z = teacher.encode_images(x.to(teacher.device))
            z_init = None if init is None else teacher.encode_images(init[sl].to(teacher.device))
            z = edit_latents(teacher, z, teacher.encode_prompts(es.src_captions[sl]),
                             teacher.encode_prompts(es.tgt_captions[sl]), cfg, z_init=z_init)
            outs.append(teacher.decode_latents(z).cpu())
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    seconds = (time.perf_counter() - start) / max(1, len(es.seeds))
    return torch.cat(outs), seconds


def score(es: EvalSet, outputs: torch.Tensor) -> dict[str, float]:
    m = M.evaluate_edit(outputs, es.inputs, es.src_masks, es.attribute, es.targets, tgt_masks=es.tgt_masks)
    return {k: float(v) for k, v in m.items()}


def evaluate(tasks: Sequence, n: int, methods: Sequence[str] = DEFAULT_METHODS, *, translator=None, teacher=None,
             edit_config: dict | None = None, batch_size: int = 64, progress: bool = False,
             examples: dict | None = None, num_examples: int = 4, held_out_offset: int = 0,
             seed_range: range = S.HELD_OUT) -> list[dict]:
    """One row per (task, method): the metrics plus ``ms_per_image``. With ``examples`` (a dict), the first
    ``num_examples`` inputs and outputs are stored there as ``examples[task] = [inputs, out_m1, ...]``.
    ``held_out_offset``: the scenes start at that many seeds into ``seed_range`` (0: the usual set) — a
    second set on which to check a checkpoint chosen on the first. ``seed_range``: ``seeds.HELD_OUT`` (what
    evaluation reports) or ``seeds.VALIDATION`` (what training's validation logs: to choose a checkpoint on)."""
    from tqdm.auto import tqdm

    rows = []
    jobs = [(t, m) for t in tasks for m in methods]
    sets = {}
    for task, method in tqdm(jobs, desc="eval", disable=not progress):
        es = sets.get(task.name) or sets.setdefault(task.name, build_eval_set(
            task, n, start_seed=seed_range.start + int(held_out_offset), seed_range=seed_range))
        out, sec = run_method(method, es, translator=translator, teacher=teacher, edit_config=edit_config,
                              batch_size=batch_size)
        rows.append({"task": task.name, "attribute": es.attribute, "method": method, "n": len(es.seeds),
                     **score(es, out), "ms_per_image": 1000 * sec})
        if examples is not None:
            examples.setdefault(task.name, [es.inputs[:num_examples]]).append(out[:num_examples])
    return rows


def examples_grid(examples: dict, methods: Sequence[str], scale: int = 4):
    """A PIL grid: per task, one row per example with input | output of each method (upscaled ``scale`` x)."""
    from PIL import Image

    from ddstrans.images import image_grid, tensor_to_pil

    rows = []
    for parts in examples.values():
        columns = [tensor_to_pil(p) for p in parts]
        for row in zip(*columns):
            rows.append([im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row])
    return image_grid(rows)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of evaluation rows."""
    head = "| task | method | n | target acc | mask IoU | kept PSNR (dB) | diversity | ms / image |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['n']} | {r['target_acc']:.3f} | {r['mask_iou']:.3f} | "
            f"{_db(r['keep_psnr'])} | {r['diversity']:.3f} | {r['ms_per_image']:.2f} |"
        )
    return "\n".join(lines)


def _db(value: float) -> str:
    """A PSNR cell; NaN (nothing the task leaves alone, e.g. color and background at once) as a dash."""
    return "—" if value != value else f"{value:.2f}"
