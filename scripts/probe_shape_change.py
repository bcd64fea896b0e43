#!/usr/bin/env python
"""Where does a translator's pincushion-shaped ``to_square`` come from? Cheap probes of the teacher, the DDS score
and the generator, each a few CPU minutes on held-out inputs (docs/experiments/shape-change-cause.md).

- ``samples``: does the teacher draw squares? Its own DDIM samples of "a <color> square on a <background>
  background", read by the strict and the lenient shape reader, per guidance scale.
- ``edit``: does per-image DDS editing (the translator's training signal, one image at a time) make squares at a
  guidance scale and timestep schedule? Strict/lenient accuracy, mask IoU with the target square, kept PSNR,
  and which of the strict reader's checks the outputs fail. With ``--translator``, the edit starts at the
  translator's outputs instead of the inputs (the source branch still sees the input): is the translator's answer
  the score's fixed point, or would the score still move it? ``--by-shape`` adds a row per source shape.
- ``gradient``: where does the DDS score push a circle or a triangle? The mean descent direction over many noises
  and timesteps, projected per pixel on "toward the shape's color", in the regions a square needs filled (target
  minus source), emptied (source minus target), and kept (target and source: its rim, one pixel inside the
  target's outline, and its inside).
- ``field``: which input pixels can one output pixel of the exported generator see (gradient non-zero)?
- ``outputs``: which strict checks a cached set of outputs (``scripts/shape_readers.py --cache``) fails.
- ``edges``: are a translator's misses drawn with half-colored sides? Per translator (``--translator A,B``), the
  strict reader's accuracy and the pixels per output whose chroma lies between a gray's and a color's
  (``HALF_CHROMA``, around the mask's threshold), over the outputs read as squares and over the misses; renders
  have none.
- ``sides``: where does a translator's square lie against the target square? Per source shape, the mask IoU, the
  area against the target's and how far each side of the output's bounding box lies inside the target's (pixels;
  negative: outside), per translator (``--translator A,B``) and, with ``--with-dds``, for per-image DDS editing at
  the evaluation's settings (the first ``--guidance``).
- ``misses``: which inputs does a translator miss? Per source shape and size of the target square
  (``AREA_LABELS``), the strict reader's accuracy, the mask IoU and the checks the misses fail, per translator
  (``--translator A,B``) and, with ``--with-dds``, for per-image DDS editing as in ``sides``.
- ``distill``: can a translator be trained toward the refined answer directly? Its ``to_square`` outputs on ``--n``
  of its training scenes, refined by per-image DDS as in ``edit --translator`` (the pairs), then the translator
  fine-tuned by regression on them (mean squared error in its latent space, or ``--fit-loss l1``; the other tasks
  replayed toward its own outputs, so only the square is asked to move). Rows: the pairs' refined answer, and the
  translator before and after, on those training scenes, the 64 usual held-out inputs and ``--other-n`` others
  (``--held-out-offset``).

    python scripts/probe_shape_change.py edit --teacher T --guidance 3,7.5 --n 16
    python scripts/probe_shape_change.py edit --translator EXPORT --guidance 1.5 --schedules eval --n 64 --by-shape
    python scripts/probe_shape_change.py edit --translator EXPORT --guidance 1.5 --schedules 5-50 --steps 400 --by-shape
    python scripts/probe_shape_change.py distill --translator EXPORT --guidance 1.5 --n 384
    python scripts/probe_shape_change.py sides --translator EXPORT_A,EXPORT_B --with-dds --guidance 3 --n 64
    python scripts/probe_shape_change.py misses --translator EXPORT_A,EXPORT_B --n 384 --held-out-offset 4000000
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddstrans.editing import EDIT_OPTIMIZERS
from ddstrans.shapes import metrics as M
from ddstrans.shapes import shape_checks as C
from ddstrans.shapes.defaults import SHAPES_EDIT_T_MAX

EVAL_T_RANGE = (50, SHAPES_EDIT_T_MAX)  # per-image editing's timesteps in `ddstrans eval` on the shapes world


def failing_checks(mask: np.ndarray, shape: str) -> list[str]:
    """Names of the strict checks of ``shape`` that ``mask`` fails (its cleaned version, as the reader sees it)."""
    m = C.clean_mask(mask)
    if m.sum() < M.MIN_PIXELS:
        return ["empty"]
    f, scores = C.shape_features(m), M.shape_scores(m)
    out = []
    if max(scores, key=scores.get) != shape:
        out.append("reads as another shape")
    if f["main_component"] < C.MIN_MAIN_COMPONENT:
        out.append("pieces")
    if f["convex_deficiency"] > C.MAX_CONVEX_DEFICIENCY:
        out.append("concave")
    if not C.ASPECT_RANGE[0] <= f["aspect"] <= C.ASPECT_RANGE[1]:
        out.append("aspect")
    if shape == "square":
        out += (["fill"] * (f["fill"] < C.SQUARE_MIN_FILL) + ["sides"] * (f["side"] < C.SQUARE_MIN_SIDE)
                + ["corners"] * (f["corner"] < C.SQUARE_MIN_CORNER))
    elif not C.looks_like(shape, m, scores[shape]):
        out.append(f"{shape} checks")
    return out


def readers_row(name, y, inputs, src, tgt, targets) -> str:
    lenient = np.mean([p == t for p, t in zip(M.classify_shape(y, strict=False), targets)])
    strict = np.mean([p == t for p, t in zip(M.classify_shape(y), targets)])
    r = M.evaluate_edit(y, inputs, src, "shape", targets, tgt_masks=tgt)
    fails = Counter(c for m, t in zip(M.estimate_mask(y), targets) for c in failing_checks(m, t))
    why = ", ".join(f"{k} {v}" for k, v in fails.most_common()) or "-"
    return f"| {name} | {len(y)} | {lenient:.3f} | {strict:.3f} | {r['mask_iou']:.3f} | {r['keep_psnr']:.2f} | {why} |"


HEAD = ("| setting | n | accuracy (lenient) | accuracy (strict) | mask IoU with target | kept PSNR (dB) | "
        "strict checks failed (count) |\n|---|---|---|---|---|---|---|")


def held_out_squares(args):
    """The ``to_square`` evaluation set of ``--n`` inputs starting ``--held-out-offset`` seeds into
    ``seeds.HELD_OUT``: the inputs ``ddstrans eval --held-out-offset`` scores."""
    from ddstrans.shapes import seeds as S
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import build_eval_set

    return build_eval_set(shapes_task("to_square"), args.n, start_seed=S.HELD_OUT.start + args.held_out_offset)


def source_shapes(es) -> np.ndarray:
    """Each input's shape, as its caption names it."""
    from ddstrans.shapes.world import parse_caption

    return np.array([parse_caption(c)["shape"] for c in es.src_captions])


def cmd_samples(args, teacher) -> None:
    from ddstrans.shapes.world import COLOR_NAMES, caption

    print("| guidance | n | square (lenient) | square (strict) | strict checks failed (count) |\n|---|---|---|---|---|")
    caps = [caption(c, "square", b) for c in COLOR_NAMES for b in ("striped", "checkered")]
    for g in args.guidance:
        gen = torch.Generator().manual_seed(0)
        x = torch.cat([teacher.sample([c] * args.n, guidance_scale=g, generator=gen)  # the teacher's own sampler
                       for c in caps])
        lenient = np.mean([s == "square" for s in M.classify_shape(x, strict=False)])
        strict = np.mean([s == "square" for s in M.classify_shape(x)])
        fails = Counter(c for m in M.estimate_mask(x) for c in failing_checks(m, "square"))
        print(f"| {g} | {len(x)} | {lenient:.3f} | {strict:.3f} | "
              f"{', '.join(f'{k} {v}' for k, v in fails.most_common()) or '-'} |")


def cmd_edit(args, teacher) -> None:
    from ddstrans.editing import EditConfig
    from ddstrans.shapes.evaluation import run_method

    es = held_out_squares(args)
    start = None
    if args.translator:  # the translator's outputs, where the edit starts
        from ddstrans.translator import Translator

        start, _ = run_method("network", es, translator=Translator.from_pretrained(args.translator))
    groups = {"": np.arange(len(es.seeds))}
    if args.by_shape:
        shapes = source_shapes(es)
        groups.update({f", {s}s": np.flatnonzero(shapes == s) for s in ("circle", "triangle")})

    x = M.as_unit(es.inputs)

    def rows(name, y):
        y = M.as_unit(y)
        for suffix, i in groups.items():
            print(readers_row(name + suffix, y[i], x[i], es.src_masks[i], es.tgt_masks[i], [es.targets[k] for k in i]),
                  flush=True)

    print(HEAD)
    if start is not None:
        rows("translator", start)
    for g in args.guidance:
        for sched in args.schedules:
            named = {"eval": (EVAL_T_RANGE, None), "train": ((50, 950), (20, 300)), "late": ((20, 300), None)}
            t_range, t_end = named[sched] if sched in named else (sched, None)
            cfg = {"steps": args.steps, "lr": args.lr, "guidance": g, "t_range": t_range, "t_range_end": t_end,
                   "optimizer": args.edit_optimizer}
            EditConfig(**cfg)  # fail early on a bad setting
            name = f"DDS edit, guidance {g}, t {t_range}{' -> ' + str(t_end) if t_end else ''}"
            y, _ = run_method("dds", es, teacher=teacher, edit_config=cfg, init=start)
            rows(name if start is None else f"{name}, from the translator's outputs", y)


def cmd_gradient(args, teacher) -> None:
    from ddstrans.editing import EditConfig
    from ddstrans.shapes import seeds as S
    from ddstrans.shapes.world import COLOR_ARRAY, COLOR_NAMES, render_scene, to_model

    print("| input | guidance | t range | fill (target - source) | empty (source - target) | rim of the kept part "
          "| inside of the kept part | background |\n|---|---|---|---|---|---|---|---|")
    for shape in ("circle", "triangle"):
        scenes = [render_scene(s, shape=shape) for s in S.take(S.HELD_OUT, 0, args.n)]
        answers = [render_scene(s, shape="square") for s in S.take(S.HELD_OUT, 0, args.n)]
        x = to_model(np.stack([r["image"] for r in scenes])).to(teacher.device)
        src_m, tgt_m = np.stack([r["mask"] for r in scenes]), np.stack([a["mask"] for a in answers])
        # per pixel, the unit direction from the background's gray to the shape's color (in [-1, 1] units)
        col = np.stack([COLOR_ARRAY[COLOR_NAMES.index(r["color"])] for r in scenes])
        bg = np.stack([r["image"] for r in scenes])
        bg = np.where(src_m[..., None], np.asarray([r["scene"].bg_colors[0] for r in scenes])[:, None, None, None], bg)
        d = col[:, None, None, :] - bg
        d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
        emb_s = teacher.encode_prompts([r["caption"] for r in scenes])
        emb_t = teacher.encode_prompts([a["caption"] for a in answers])
        inner = ~M.dilate(~tgt_m, 1)
        regions = {"fill": tgt_m & ~src_m, "empty": src_m & ~tgt_m, "rim": tgt_m & src_m & ~inner,
                   "inside": inner & src_m, "background": ~M.dilate(src_m | tgt_m, 1)}
        for g in args.guidance:
            for t_range in args.t_ranges:
                cfg = EditConfig(method="dds", guidance=g, t_range=t_range)
                gen = torch.Generator(device=teacher.device).manual_seed(0)
                total = torch.zeros_like(x)
                for _ in range(args.draws):
                    total += cfg.grad(teacher, x, x, emb_s, emb_t, generator=gen)
                step = (-total / args.draws).permute(0, 2, 3, 1).cpu().numpy()  # descent direction, (B, H, W, 3)
                toward = (step * d).sum(-1)
                scale = np.abs(toward).mean()
                cells = [f"{toward[r].mean() / scale:+.2f}" if r.any() else "-" for r in regions.values()]
                print(f"| {shape} | {g} | {tuple(t_range)} | " + " | ".join(cells) + " |", flush=True)


def mirror_half(gen: torch.Generator, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random half of the rows of every tensor in ``images`` mirrored left to right. A mirrored scene of
    the shapes world is another scene of it (triangles still point up, stripes at 45 and 135 degrees swap), and the
    mirrored refined output is the answer for it, so each pair counts twice."""
    flip = torch.rand(len(images[0]), generator=gen) < 0.5
    return tuple(torch.where(flip[:, None, None, None], im.flip(-1), im) for im in images)


FIT_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


def fit_to_pairs(tr, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int = 32, seed: int = 0,
                 mirror: bool = False, loss: str = "mse") -> None:
    """Fine-tune ``tr.generator`` in place: the error (``loss``: mean squared or mean absolute) to ``y`` for
    ``to_square`` on ``x``, plus, on as many random training scenes, each with one of the other tasks, the error to
    the untouched generator's outputs. ``mirror``: each batch's pairs and scenes mirrored left to right at random
    (:func:`mirror_half`).

    Why the absolute error: where an input leaves it uncertain whether a pixel column lies inside the square, the
    squared error's best answer is the column's mean, a half-colored column that the chroma mask cuts into a ragged
    side; the absolute error's is its median, the column in or out. (Measured: it draws no more squares on held-out
    inputs; docs/experiments/shape-change-cause.md.)"""
    import copy
    import random

    from ddstrans.shapes import seeds as S
    from ddstrans.shapes.world import render_scene, to_model

    train_scenes = S.take(S.TRANSLATOR_TRAIN, 0, 100_000)  # the scenes of the shapes data's default num_train
    g = tr.generator
    ref = copy.deepcopy(g).eval()
    others = [tr.task_table.index(t) for t in tr.tasks if t != "to_square"]
    square = tr.task_table.index("to_square")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    error = FIT_LOSSES[loss]
    opt = torch.optim.AdamW(g.requires_grad_(True).train().parameters(), lr=lr, weight_decay=0.0)

    def forward(net, z, ids):
        src, tgt = tr.task_table.first(ids)
        return net(z, task_ids=ids, src_emb=src, tgt_emb=tgt).float()

    zx, zy = tr.encode(x), tr.encode(y)  # the pairs in latent space, once
    bar = tqdm(range(steps), desc="fit")
    for _ in bar:
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        bx, by = mirror_half(gen, zx[idx], zy[idx]) if mirror else (zx[idx], zy[idx])
        loss_sq = error(forward(g, bx, torch.full((batch,), square)), by)
        seeds = [rng.choice(train_scenes) for _ in range(batch)]
        z = tr.encode(to_model(np.stack([render_scene(s)["image"] for s in seeds])))
        if mirror:
            (z,) = mirror_half(gen, z)
        ids = torch.tensor([rng.choice(others) for _ in range(batch)])
        with torch.no_grad():
            kept = forward(ref, z, ids)
        total = loss_sq + error(forward(g, z, ids), kept)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        bar.set_postfix(square=f"{loss_sq.item():.5f}")
    g.requires_grad_(False).eval()


def refined_pairs(path: Path | None, pairs, outputs: torch.Tensor, edit: dict, teacher) -> torch.Tensor:
    """The translator's ``outputs`` on ``pairs`` refined by per-image DDS with ``edit``'s settings. With ``path``,
    kept there per scene: a scene already refined with the same settings from the same output is reused, the others
    are refined and added. The refinement of a thousand scenes takes tens of minutes on a CPU; one refinement serves
    any number of fits, and a larger ``--n`` refines only the new scenes."""
    import dataclasses

    from ddstrans.io_safety import atomic_output
    from ddstrans.shapes.evaluation import run_method

    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in edit.items()}
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["edit"] == settings:
            kept = {int(s): (o, r) for s, o, r in zip(saved["seeds"], saved["outputs"], saved["refined"])}
        else:
            print(f"refined pairs: {path} holds other settings ({saved['edit']}); refining anew", flush=True)
    reuse = [s in kept and torch.equal(kept[s][0], o) for s, o in zip(pairs.seeds, outputs)]
    todo = [i for i, r in enumerate(reuse) if not r]
    refined = torch.stack([kept[s][1] if r else torch.zeros_like(o) for s, o, r in zip(pairs.seeds, outputs, reuse)])
    print(f"refined pairs: {len(reuse) - len(todo)} reused, {len(todo)} to refine", flush=True)
    if todo:
        sub = dataclasses.replace(
            pairs, seeds=[pairs.seeds[i] for i in todo], inputs=pairs.inputs[todo],
            src_captions=[pairs.src_captions[i] for i in todo], tgt_captions=[pairs.tgt_captions[i] for i in todo])
        refined[todo] = run_method("dds", sub, teacher=teacher, edit_config=edit, init=outputs[todo], batch_size=32,
                                   progress=True)[0].clamp(-1, 1)
    if path is not None and todo:
        for s, o, r in zip(pairs.seeds, outputs, refined):
            kept[int(s)] = (o, r)
        with atomic_output(path) as tmp:  # a crash mid-write leaves no half file to be reused
            torch.save({"edit": settings, "seeds": list(kept), "outputs": torch.stack([o for o, _ in kept.values()]),
                        "refined": torch.stack([r for _, r in kept.values()])}, tmp)
    return refined


def cmd_distill(args, teacher) -> None:
    from ddstrans.shapes import seeds as S
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import build_eval_set, run_method, score
    from ddstrans.translator import Translator

    if not args.translator:
        raise SystemExit("distill needs --translator")
    if args.save is not None and args.save.exists():  # before the refinement's minutes, not after
        raise SystemExit(f"distill --save: {args.save} exists; choose a new directory")
    task = shapes_task("to_square")
    tr = Translator.from_pretrained(args.translator)
    sets = {"training scenes": build_eval_set(task, args.n, seed_range=S.TRANSLATOR_TRAIN),
            "64 held-out inputs": build_eval_set(task, 64),
            f"{args.other_n} other held-out inputs": build_eval_set(
                task, args.other_n, start_seed=S.HELD_OUT.start + args.held_out_offset)}
    print("| outputs | " + " | ".join(f"{k}: strict / IoU / kept (dB)" for k in sets) + " |\n|---|---|---|---|")

    def cell(es, outs) -> str:
        if outs is None:
            return "-"
        m = score(es, outs)
        return f"{m['target_acc']:.3f} / {m['mask_iou']:.3f} / {m['keep_psnr']:.2f}"

    def row(name, outs):
        cells = [cell(es, o) for es, o in zip(sets.values(), outs)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    before = [run_method("network", es, translator=tr)[0] for es in sets.values()]
    pairs = sets["training scenes"]
    edit = {"steps": args.steps, "lr": args.lr, "guidance": args.guidance[0], "t_range": args.refine_t_range}
    refined = refined_pairs(args.pairs, pairs, before[0], edit, teacher)
    row(f"refined by DDS, guidance {args.guidance[0]} (the pairs' targets)", [refined, None, None])
    row("translator", before)
    keep = torch.ones(len(refined), dtype=torch.bool)
    if args.only_squares:  # targets the strict reader accepts: the reader's choice, not the score's
        keep = torch.tensor([s == "square" for s in M.classify_shape(refined)])
        if not keep.any():
            raise SystemExit(f"distill --only-squares: none of the {len(keep)} refined targets reads as a square; "
                             "nothing to fit")
    fit_to_pairs(tr, pairs.inputs[keep], refined[keep], args.fit_steps, args.fit_lr, mirror=args.fit_mirror,
                 loss=args.fit_loss)
    label = f"fitted to {int(keep.sum())} pairs, {args.fit_steps} steps, lr {args.fit_lr:g}" + (
        ", mirrored at random" if args.fit_mirror else "") + (f", {args.fit_loss} loss" if args.fit_loss != "mse" else "")
    row(label, [run_method("network", es, translator=tr)[0] for es in sets.values()])
    if args.save:
        save_fitted(tr, Path(args.translator), args.save, {
            "pairs": int(keep.sum()), "refine": edit, "steps": args.fit_steps, "lr": args.fit_lr,
            "mirror": args.fit_mirror, "loss": args.fit_loss})
        print(f"fitted translator: {args.save}", flush=True)


def save_fitted(tr, source: Path, out: Path, fit: dict) -> None:
    """The fitted translator as an export: ``source``'s task table and settings with the fitted generator, hashed
    and verified as ``ddstrans export`` does. Its model card, examples and ONNX files are left out: they describe
    the weights before the fit."""
    import json
    import shutil
    import tempfile

    from ddstrans.io_safety import swap_in_directory
    from ddstrans.translator import Translator
    from ddstrans.translator_files import hash_tree

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        shutil.copy2(source / "tasks.safetensors", tmp / "tasks.safetensors")
        tr.generator.save_pretrained(tmp / "generator")
        info = {k: v for k, v in tr.info.items() if k != "files"}
        info["fitted"] = {"from": str(source.resolve()), **fit}
        info["files"] = hash_tree(tmp)
        (tmp / "translator.json").write_text(json.dumps(info, indent=2))
        Translator.from_pretrained(tmp)  # verifies as a user would load it
        swap_in_directory(tmp, out)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_field(args) -> None:
    from ddstrans.shapes import seeds as S
    from ddstrans.shapes.world import render_scene, to_model
    from ddstrans.translator import Translator

    tr = Translator.from_pretrained(args.translator)
    x = to_model(render_scene(S.HELD_OUT.start)["image"]).requires_grad_(True)
    print("| output pixel | input pixels that reach it (gradient non-zero) | share of the gradient's mass within 2 px "
          "| within 4 px | within 8 px |\n|---|---|---|---|---|")
    yy, xx = np.mgrid[0:x.shape[-2], 0:x.shape[-1]]
    ids = torch.tensor([tr.task_table.index("to_square")])
    src, tgt = tr.task_table.first(ids)
    for (py, px) in ((16, 16), (2, 2), (16, 2)):
        y = tr.generator(x, task_ids=ids, src_emb=src, tgt_emb=tgt)  # pixel space: latents are the image
        (g,) = torch.autograd.grad(y[0, :, py, px].sum(), x)
        mass = g.abs().sum(1)[0].numpy()
        dist = np.maximum(np.abs(yy - py), np.abs(xx - px))  # Chebyshev distance to the output pixel
        share = [mass[dist <= r].sum() / mass.sum() for r in (2, 4, 8)]
        print(f"| ({py}, {px}) | {int((mass > 0).sum())} of {mass.size} | " + " | ".join(f"{v:.3f}" for v in share) + " |")


HALF_CHROMA = (0.1, 0.4)  # renders: grays 0, colors >= 0.5; the shape mask cuts at metrics.CHROMA_THRESHOLD


def half_colored(images) -> np.ndarray:
    """Per image, the pixels whose chroma lies in ``HALF_CHROMA``: neither background nor shape, the pixels the
    chroma mask's threshold decides by a hair."""
    c = M.chroma(images)
    return ((c > HALF_CHROMA[0]) & (c < HALF_CHROMA[1])).sum((-2, -1))


def cmd_edges(args) -> None:
    from ddstrans.shapes.evaluation import run_method
    from ddstrans.translator import Translator

    if not args.translator:
        raise SystemExit("edges needs --translator (one or more exports, comma-separated)")
    es = held_out_squares(args)
    print("| outputs | n | strict acc | half-colored pixels per square | per miss |\n|---|---|---|---|---|")
    print(f"| rendered answers | {args.n} | 1.000 | {half_colored(es.answers).mean():.1f} | - |")
    for path in args.translator.split(","):
        y, _ = run_method("network", es, translator=Translator.from_pretrained(path))
        ok = np.array([p == t for p, t in zip(M.classify_shape(y), es.targets)])
        half = half_colored(y)
        cells = [f"{half[m].mean():.1f}" if m.any() else "-" for m in (ok, ~ok)]
        print(f"| {path} | {args.n} | {ok.mean():.3f} | " + " | ".join(cells) + " |", flush=True)


AREA_BINS = (110, 156)  # px of the target square: the terciles over the 384 held-out inputs of the four usual sets
AREA_LABELS = (f"small (< {AREA_BINS[0]})", f"mid ({AREA_BINS[0]}-{AREA_BINS[1] - 1})", f"large (>= {AREA_BINS[1]})")


def cmd_misses(args) -> None:
    es = held_out_squares(args)
    runs = output_makers(args, es, "misses")
    shapes = source_shapes(es)
    bins = np.searchsorted(AREA_BINS, es.tgt_masks.reshape(args.n, -1).sum(1), side="right")
    groups = sorted(set(zip(shapes, bins)))
    print("| outputs | source shape | target square (px) | n | strict acc | mask IoU | misses: failed checks |\n"
          "|---|---|---|---|---|---|---|")
    for path, make in runs:
        y = make()
        hit = [p == t for p, t in zip(M.classify_shape(y), es.targets)]
        masks = M.estimate_mask(M.as_unit(y))
        for shape, b in groups:
            idx = [k for k in range(args.n) if (shapes[k], bins[k]) == (shape, b)]
            iou = np.mean([M.mask_iou(masks[k], es.tgt_masks[k]) for k in idx])
            why = Counter(",".join(failing_checks(masks[k], "square")) or "-" for k in idx if not hit[k])
            cells = ", ".join(f"{k} {v}" for k, v in why.most_common()) or "-"
            print(f"| {path} | {shape} | {AREA_LABELS[b]} | {len(idx)} | {np.mean([hit[k] for k in idx]):.3f} | {iou:.3f} | "
                  f"{cells} |", flush=True)


SIDES = ("top", "bottom", "left", "right")


def inward_offsets(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """How far each side (``SIDES``) of ``mask``'s bounding box lies inside ``target``'s, in pixels (negative:
    outside it); NaN for an empty mask. Why: an IoU says a square is off, these say which way."""
    def box(m):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        return rows[0], rows[-1], cols[0], cols[-1]

    if not mask.any():
        return np.full(4, np.nan)
    (top, bottom, left, right), (t_top, t_bottom, t_left, t_right) = box(mask), box(target)
    return np.array([top - t_top, t_bottom - bottom, left - t_left, t_right - right], dtype=float)


def output_makers(args, es, probe: str) -> list[tuple[str, object]]:
    """``(name, make outputs)`` per ``--translator`` and, with ``--with-dds``, for per-image DDS editing at the
    evaluation's settings (the first ``--guidance``)."""
    from ddstrans.shapes.evaluation import run_method
    from ddstrans.translator import Translator

    runs = [(path, lambda p=path: run_method("network", es, translator=Translator.from_pretrained(p))[0])
            for path in (args.translator.split(",") if args.translator else [])]
    if args.with_dds:
        from ddstrans.shapes.defaults import load_shapes_teacher

        teacher = load_shapes_teacher(args.teacher)
        edit = {"steps": args.steps, "lr": args.lr, "guidance": args.guidance[0], "t_range": EVAL_T_RANGE}
        runs.append((f"per-image DDS, guidance {args.guidance[0]:g}",
                     lambda: run_method("dds", es, teacher=teacher, edit_config=edit)[0]))
    if not runs:
        raise SystemExit(f"{probe} needs --translator (one or more exports, comma-separated) and/or --with-dds")
    return runs


def cmd_sides(args) -> None:
    es = held_out_squares(args)
    shapes = source_shapes(es)
    runs = output_makers(args, es, "sides")
    print("| outputs | source shape | n | mask IoU | area / target's | inside the target by (px): "
          + " / ".join(SIDES) + " |\n|---|---|---|---|---|---|")
    for name, make in runs:
        masks = M.estimate_mask(M.as_unit(make()))
        for shape in sorted(set(shapes)):
            idx = np.flatnonzero(shapes == shape)
            iou = np.mean([M.mask_iou(masks[k], es.tgt_masks[k]) for k in idx])
            area = np.mean([masks[k].sum() / es.tgt_masks[k].sum() for k in idx])
            off = np.nanmean([inward_offsets(masks[k], es.tgt_masks[k]) for k in idx], axis=0)
            print(f"| {name} | {shape} | {len(idx)} | {iou:.3f} | {area:.2f} | "
                  + " / ".join(f"{v:+.2f}" for v in off) + " |", flush=True)


def cmd_outputs(args) -> None:
    z = np.load(args.cache, allow_pickle=False)
    targets = list(z["targets"])
    print(HEAD)
    for k in z.files:
        if k.startswith("out_"):
            print(readers_row(k[4:], z[k], z["inputs"], z["src_masks"], z["tgt_masks"], targets))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=("samples", "edit", "gradient", "field", "outputs", "distill", "edges", "sides",
                                     "misses"))
    p.add_argument("--teacher", default=None, help="unset: the shipped shapes teacher")
    p.add_argument("--translator", default=None,
                   help="exported translator (field; edit: start the edit at its outputs; distill: the one to fit; "
                        "edges, sides, misses: one or more, comma-separated)")
    p.add_argument("--with-dds", action="store_true",
                   help="sides, misses: rows for per-image DDS editing too (the first --guidance)")
    p.add_argument("--by-shape", action="store_true", help="edit: a row per source shape too")
    p.add_argument("--cache", type=Path, default=None, help="outputs of scripts/shape_readers.py (outputs)")
    p.add_argument("--guidance", default="3,7.5", help="comma-separated CFG scales (distill, sides: the first)")
    p.add_argument("--n", type=int, default=16, help="inputs (edit, gradient, edges, sides, misses), samples per caption (samples) or training scenes (distill)")
    p.add_argument("--steps", type=int, default=100, help="edit, distill, sides, misses: per-image DDS steps")
    p.add_argument("--lr", type=float, default=0.02, help="edit, distill, sides, misses: per-image DDS learning rate")
    p.add_argument("--edit-optimizer", choices=sorted(EDIT_OPTIMIZERS), default="sgd",
                   help="edit: the per-image optimizer (adam: each pixel stepped by its normalised gradient)")
    p.add_argument("--schedules", default="eval,train", help="edit: eval ([50, 600)), train "
                   "([50, 950) -> [20, 300) over the edit, the main job's schedule), late ([20, 300)) and/or "
                   "a fixed range A-B (e.g. 5-50)")
    p.add_argument("--t-ranges", default="50-950,50-300", help="gradient: comma-separated t ranges A-B")
    p.add_argument("--draws", type=int, default=64, help="gradient: noise/timestep draws averaged")
    p.add_argument("--held-out-offset", type=int, default=None,
                   help="edit, edges, sides, misses: inputs start this many seeds into seeds.HELD_OUT (default 0: the usual set); distill: "
                        "where its second held-out set starts (default 1000000)")
    p.add_argument("--other-n", type=int, default=128, help="distill: inputs of the second held-out set")
    p.add_argument("--fit-steps", type=int, default=300, help="distill: fine-tuning steps (batch 32)")
    p.add_argument("--fit-lr", type=float, default=3e-5, help="distill: AdamW learning rate")
    p.add_argument("--fit-loss", choices=tuple(FIT_LOSSES), default="mse",
                   help="distill: the fit's error, squared (mse) or absolute (l1)")
    p.add_argument("--fit-mirror", action="store_true",
                   help="distill: mirror a random half of each fitting batch left to right (pairs and scenes)")
    p.add_argument("--refine-t-range", default="50-600",
                   help="distill: timesteps A-B of the refinement (default: the evaluation's per-image range)")
    p.add_argument("--pairs", type=Path, default=None,
                   help="distill: file keeping the refined pairs per scene; a scene refined before with the same "
                        "settings from the same output is reused")
    p.add_argument("--save", type=Path, default=None, help="distill: directory for the fitted translator's export")
    p.add_argument("--only-squares", action="store_true",
                   help="distill: fit only the pairs whose refined target the strict reader reads as a square")
    args = p.parse_args(argv)
    if args.held_out_offset is None:
        args.held_out_offset = 1_000_000 if args.probe == "distill" else 0
    args.guidance = [float(g) for g in args.guidance.split(",")]
    args.schedules = [s for s in args.schedules.split(",") if s]

    def t_range(text: str) -> tuple[int, ...]:  # "A-B" -> (A, B)
        return tuple(int(v) for v in text.split("-"))

    args.t_ranges = [t_range(r) for r in args.t_ranges.split(",")]
    args.schedules = [t_range(s) if "-" in s else s for s in args.schedules]
    args.refine_t_range = t_range(args.refine_t_range)
    torch.set_grad_enabled(True)
    without_teacher = {"field": cmd_field, "outputs": cmd_outputs, "edges": cmd_edges, "sides": cmd_sides,
                       "misses": cmd_misses}
    if args.probe in without_teacher:
        without_teacher[args.probe](args)
        return 0
    from ddstrans.shapes.defaults import load_shapes_teacher

    teacher = load_shapes_teacher(args.teacher)
    {"samples": cmd_samples, "edit": cmd_edit, "gradient": cmd_gradient, "distill": cmd_distill}[args.probe](args, teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
