"""Which checker pattern does each method draw for ``to_checkered``? Prints, per held-out input, the best-fitting
checker template (cell size and offset, as ``ddstrans.shapes.metrics.checker_r2`` searches them), its r² and the
background the reader sees.

Why: networks trained with DDS erase the stripes but draw no checkers, while per-image DDS draws them. If
per-image DDS settles on a different cell size and offset for each input, the DDS target is ambiguous, and a
deterministic network regressing on it is expected to average the candidates into a flat gray.

    python scripts/diagnose_checkers.py --n 8                                  # per-image DDS
    python scripts/diagnose_checkers.py --n 8 --translator checkpoints/shapes-translator
    python scripts/diagnose_checkers.py --n 6 --seeds 0,1,2     # same inputs, different DDS noise: same checker?

With several ``--seeds`` the table has one column per seed: if an input gets the same checker under every seed,
the choice is a function of the input (a network can learn it); if not, the DDS target is ambiguous per input.

    python scripts/diagnose_checkers.py --n 8 --seeds 0,1 --shared-noise   # one noise for every input and step

Below that, per column, how many inputs read as checkered for each stripe angle of the input (a change the network
learned for some orientations only shows there), then what the background change's diversity (``ddstrans eval``)
is made of: the diversity, the two gray levels of the output's background against the scene's own (the answer
keeps the input's two grays), and what the renderer's answer would score redrawn with the method's most common
template at each scene's own grays, and with each scene's own template at the method's mean levels, and with both:
which of the two, phase or grays, costs the diversity; last, that template at each scene's grays with the darker
gray on the same cells in every scene: the most a translator that draws one phase for every input can reach.

With ``--shared-noise`` each seed is the seed of one noise tensor that every input uses at every step (as
``loss.shared_noise_prob=1`` in training). Below the table, per seed: of the inputs that got the same cell size, how
many share its most common offset (1.0: the offset follows the noise and the cell size, so a network can learn it).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddstrans.evaluation import build_eval_set, run_method  # noqa: E402
from ddstrans.shapes import metrics as M  # noqa: E402
from ddstrans.shapes.defaults import load_shapes_teacher, shapes_task  # noqa: E402
from ddstrans.shapes.world import render, sample_scene  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out inputs")
    p.add_argument("--translator", type=Path, default=None, help="score this exported network instead of DDS")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--t-max", type=int, default=600)
    p.add_argument("--seeds", default="0", help="comma-separated DDS noise seeds (per-image DDS only)")
    p.add_argument("--shared-noise", action="store_true",
                   help="each seed draws one noise tensor that every input uses at every step (per-image DDS only)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.translator is not None and args.shared_noise:
        p.error("--shared-noise is for per-image DDS; a translator draws no noise")
    if args.translator is not None and len(seeds) > 1:
        p.error("--seeds compares per-image DDS runs; a translator is deterministic (drop --seeds or --translator)")
    es = build_eval_set(shapes_task("to_checkered"), args.n)
    if args.translator is not None:
        from ddstrans.translator import Translator

        out, _ = run_method("network", es, translator=Translator.from_pretrained(args.translator))
        outs, label = [out], f"network {args.translator}"
    else:
        teacher = load_shapes_teacher(None)
        outs = [run_method("dds", es, teacher=teacher, edit_config=dict(
            steps=args.steps, lr=args.lr, t_range=(50, args.t_max), seed=s,
            shared_noise_seed=s if args.shared_noise else None))[0] for s in seeds]
        kind = "one shared noise per seed" if args.shared_noise else "noise seeds"
        label = f"per-image DDS ({args.steps} steps, lr {args.lr}, t in [50, {args.t_max}), {kind} {seeds})"
    print(f"{label}: best checker template per input, as cell px @ (x, y) offset, r², background read as\n")
    cols = [f"seed {s}" for s in seeds] if len(outs) > 1 else ["best checker"]
    print("| input seed | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    per_method = [M.as_unit(o) for o in outs]
    fits = [[M.checker_fit(imgs[i]) for i in range(len(es.seeds))] for imgs in per_method]
    for i, seed in enumerate(es.seeds):
        cells = []
        for imgs, fit in zip(per_method, fits):
            (cell, ox, oy), r2 = fit[i]
            cells.append(f"{cell} @ ({ox}, {oy}), {r2:.2f}, {M.classify_background(imgs[i][None])[0]}")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print("\noffset agreement among inputs with the same cell size (most common offset / inputs; groups of >= 2):")
    for col, fit in zip(cols, fits):
        print(f"  {col}: {offset_agreement([f[0] for f in fit])}")
    print("\ninputs read as checkered, by the input's stripe angle (a change learned for some orientations only):")
    for col, imgs in zip(cols, per_method):
        counts = checkered_by_angle(es.seeds, imgs)
        print(f"  {col}: " + ", ".join(f"{a:g}°: {k}/{n}" for a, (k, n) in counts.items()))
    scene = scene_levels(es.seeds)
    inputs = M.as_unit(es.inputs)
    print(f"\nbackground gray levels (dark / light, mean ± sd over inputs); the scenes': {_levels(scene)}")
    print(f"  answer (the renderer's): diversity {what_if_diversity(es.seeds, inputs):.3f}")
    for col, imgs, fit in zip(cols, per_method, fits):
        out = background_levels(imgs, es.src_masks)
        r = [np.corrcoef(scene[:, j], out[:, j])[0, 1] for j in (0, 1)]
        template = Counter(f[0] for f in fit).most_common(1)[0][0]
        mean_levels = (float(out[:, 0].mean()), float(out[:, 1].mean()))
        print(f"  {col}: diversity {M.diversity(imgs, inputs):.3f}; levels {_levels(out)}, correlation with the "
              f"scene's {r[0]:.2f} / {r[1]:.2f}")
        print(f"    the answer with one template {template[0]} px @ ({template[1]}, {template[2]}) at each scene's grays: "
              f"{what_if_diversity(es.seeds, inputs, template=template):.3f}; with each scene's template at levels "
              f"{mean_levels[0]:.2f} / {mean_levels[1]:.2f}: {what_if_diversity(es.seeds, inputs, levels=mean_levels):.3f}; "
              f"with both: {what_if_diversity(es.seeds, inputs, template=template, levels=mean_levels):.3f}")
        print(f"    one phase for every input (that template, the darker gray on the same cells) at each scene's grays: "
              f"{what_if_diversity(es.seeds, inputs, template=template, dark_first=True):.3f} (the most a translator "
              f"drawing one checkerboard phase can reach)")


def _levels(lv: np.ndarray) -> str:
    return f"{lv[:, 0].mean():.2f} ± {lv[:, 0].std():.2f} / {lv[:, 1].mean():.2f} ± {lv[:, 1].std():.2f}"


def background_levels(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(N, 2)``: per image, the mean gray of the darker and of the lighter background pixels (outside the shape
    mask dilated by one pixel, split at their mean)."""
    out = []
    for img, mask in zip(images, masks):
        lum = img.mean(-1)[~M.dilate(mask, 1)]
        dark = lum < lum.mean()
        out.append((lum[dark].mean() if dark.any() else lum.mean(), lum[~dark].mean()))
    return np.array(out)


def checkered_by_angle(seeds, images: np.ndarray) -> dict[float, tuple[int, int]]:
    """Per stripe angle of the input scenes (sorted): how many of ``images`` read as checkered, and of how many."""
    kinds = M.classify_background(images)
    out: dict[float, list[int]] = {}
    for s, kind in zip(seeds, kinds):
        c = out.setdefault(float(sample_scene(s).stripe_angle), [0, 0])
        c[0] += kind == "checkered"
        c[1] += 1
    return {a: (k, n) for a, (k, n) in sorted(out.items())}


def scene_levels(seeds) -> np.ndarray:
    """``(N, 2)``: each scene's two background grays, dark first (the answer keeps them)."""
    return np.array([sorted(sample_scene(s).bg_colors) for s in seeds])


def what_if_diversity(seeds, inputs: np.ndarray, template=None, levels=None, dark_first: bool = False) -> float:
    """Diversity of the renderer's answers (checkered backgrounds) with every scene's checker ``template`` (cell,
    x offset, y offset) and/or two gray ``levels`` replaced by the given ones: ``None`` keeps the scene's.
    ``dark_first``: each scene's own grays, the darker on the same cells in every scene (the renderer draws which
    gray takes which cells at random; a translator that draws one phase for every input fixes it)."""
    images = []
    for s in seeds:
        scene = sample_scene(s, background="checkered")
        if template is not None:
            scene = replace(scene, checker_cell=int(template[0]), checker_offset=(int(template[1]), int(template[2])))
        if levels is not None:
            scene = replace(scene, bg_colors=tuple(float(v) for v in levels))
        elif dark_first:
            scene = replace(scene, bg_colors=tuple(sorted(scene.bg_colors)))
        images.append(render(scene)[0])
    return M.diversity(np.stack(images), inputs)


def offset_agreement(templates: list[tuple[int, int, int]]) -> str:
    """``cell px: k/n`` per cell size met on at least two inputs: k of its n inputs share the most common offset."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for cell, ox, oy in templates:
        groups.setdefault(cell, []).append((ox, oy))
    parts = [f"{cell} px: {Counter(offs).most_common(1)[0][1]}/{len(offs)}"
             for cell, offs in sorted(groups.items()) if len(offs) >= 2]
    return ", ".join(parts) or "no cell size on two inputs"


if __name__ == "__main__":
    main()
