#!/usr/bin/env python
"""Which color changes keep the outline under zero-shot DDS editing, and why: one table over color pairs.

On world v1 (saturated colors on mid grays) the teacher's DDS edits lost the shape's outline on most color changes
(mask IoU 0.13-0.93 against a 0.85 bar; docs/results-world-v1.md), which led to world v2. This script edits the *same* rendered scenes for every ordered color pair, beside each pair's color geometry,
so the IoU can be read against it:

- ``distance``: Euclidean distance of the two palette colors (RGB in [0, 1]);
- ``midpoint chroma``: chroma (max - min channel) of their mean, the color halfway along the edit's path; a gray
  midpoint means the object is as good as gone halfway, and a teacher that sees no object redraws it anywhere;
- ``margin``: mean over the scenes' two grays g of |a - g|^2 + |b - g|^2 - |a - b|^2 (a, b the two colors): how much
  better "the shape is here, in the new color" explains a shape seen in the old color than "background here, the
  new shape elsewhere" does. Where it is small or negative, the teacher's own posterior, at the noise levels where
  color is decided, puts the recolored shape elsewhere;
- Spearman rank correlations of the IoU with the three, over the pairs measured.

``--bg-split`` repeats the pairs on scenes with light backgrounds (mean gray in the palette's upper third: >= 0.2
for v2's grays 0.0-0.3) and on dark ones (lower third: <= 0.1); ``--via A>B>C`` compares the edit A->C with two edits A->B, B->C (the second starts from the first's
result; IoU against the input's mask). Edit settings default to the teacher card's (100 steps, lr 0.02, guidance
3, t in [50, 600); the previous teacher's card, checkpoints/shapes-teacher-eps, measured at 7.5).

    python scripts/diagnose_color_pairs.py --n 16                       # all 12 ordered pairs
    python scripts/diagnose_color_pairs.py --n 16 --pairs 'red>blue,green>yellow' --bg-split --via 'blue>green>yellow'
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddstrans.shapes import COLOR_NAMES, COLORS, GRAYS, render_batch, sample_scene, to_model  # noqa: E402
from ddstrans.shapes import metrics as M  # noqa: E402
from ddstrans.shapes.defaults import SHAPES_EDIT_GUIDANCE  # noqa: E402

# mean background gray of the --bg-split groups: the upper and the lower third of the palette's grays (0.2 and 0.1
# for grays 0.0-0.3); 1e-9 of slack so that a scene exactly at a bound (as v2's grays allow) is in its group
LIGHT = min(GRAYS) + 2 / 3 * (max(GRAYS) - min(GRAYS)) - 1e-9
DARK = min(GRAYS) + 1 / 3 * (max(GRAYS) - min(GRAYS)) + 1e-9


def pair_geometry(src: str, tgt: str) -> dict[str, float]:
    """Distance between two palette colors and the chroma of their midpoint (RGB in [0, 1])."""
    a, b = np.asarray(COLORS[src]), np.asarray(COLORS[tgt])
    mid = (a + b) / 2
    return {"distance": float(np.linalg.norm(a - b)), "midpoint_chroma": float(mid.max() - mid.min())}


def background_margin(src: str, tgt: str, grays) -> float:
    """Mean over ``grays`` of |a - g|^2 + |b - g|^2 - |a - b|^2 for the palette colors a, b (RGB in [0, 1])."""
    a, b = np.asarray(COLORS[src]), np.asarray(COLORS[tgt])
    return float(np.mean([((a - g) ** 2).sum() + ((b - g) ** 2).sum() - ((a - b) ** 2).sum() for g in grays]))


def scene_grays(seeds) -> list[float]:
    """The two background grays of each scene, flattened."""
    return [g for s in seeds for g in sample_scene(s).bg_colors]


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties share their mean rank
            r[v == val] = r[v == val].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def scenes_by_background(n: int, light: bool | None, start: int = 0, max_tries: int = 100_000) -> list[int]:
    """The first ``n`` scene seeds from ``start`` on: any (None), light (mean gray >= LIGHT) or dark (<= DARK);
    RuntimeError when ``max_tries`` seeds do not hold ``n``."""
    seeds, s = [], start
    while len(seeds) < n:
        if s - start >= max_tries:
            raise RuntimeError(f"only {len(seeds)} of {n} scenes with a {'light' if light else 'dark'} background "
                               f"in {max_tries} seeds")
        g = float(np.mean(sample_scene(s).bg_colors))
        if light is None or (light and g >= LIGHT) or (light is False and g <= DARK):
            seeds.append(s)
        s += 1
    return seeds


def parse_pairs(text: str, hops: int = 2) -> list[tuple[str, ...]]:
    """'red>blue,green>yellow' -> [('red', 'blue'), ...]; 'all' -> every ordered pair; unknown colors refused."""
    if text == "all":
        return list(itertools.permutations(COLOR_NAMES, 2))
    out = []
    for item in filter(None, text.split(",")):
        cols = tuple(item.split(">"))
        if len(cols) != hops or any(c not in COLORS for c in cols):
            raise ValueError(f"{item!r}: expected {hops} of {', '.join(COLOR_NAMES)} joined by '>'")
        out.append(cols)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(ROOT / "checkpoints" / "shapes-teacher"))
    p.add_argument("--n", type=int, default=16, help="scenes per pair (the same seeds for every pair)")
    p.add_argument("--pairs", default="all", help="'all' or e.g. 'red>blue,green>yellow'")
    p.add_argument("--bg-split", action="store_true", help="also on light-only and dark-only backgrounds")
    p.add_argument("--via", default="", help="two-hop edits, e.g. 'blue>green>yellow' (comma-separated)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--guidance", type=float, default=SHAPES_EDIT_GUIDANCE)
    p.add_argument("--t-min", type=int, default=50)
    p.add_argument("--t-max", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        p.error(f"--n and --steps must be >= 1, got {args.n} and {args.steps}")
    try:
        pairs, vias = parse_pairs(args.pairs), parse_pairs(args.via, hops=3)
    except ValueError as e:
        p.error(str(e))

    import torch

    from ddstrans import Teacher
    from ddstrans.editing import EditConfig, edit_latents

    torch.set_num_threads(args.threads)
    teacher = Teacher.from_pretrained(args.teacher)
    cfg = EditConfig(steps=args.steps, lr=args.lr, guidance_scale=args.guidance, loss_scale=2000.0,
                     t_range=(args.t_min, args.t_max), method="dds", seed=args.seed)

    def captions(seeds, color):
        return teacher.encode_prompts([sample_scene(s, color=color).caption for s in seeds])

    def edit(seeds, src, tgt, x=None, first=None):
        """DDS edit of the scenes in ``src`` (or of ``x``, images in [-1, 1]) to ``tgt``, scored against the scenes
        in ``first`` (default ``src``): the input of a chain of edits."""
        imgs, masks, _ = render_batch(seeds, color=first or src)
        x = to_model(imgs) if x is None else x
        z = edit_latents(teacher, teacher.encode_images(x), captions(seeds, src), captions(seeds, tgt), cfg,
                         progress=True)
        y = teacher.decode_latents(z)
        return y, M.evaluate_edit(y, imgs, masks, "color", tgt)

    groups = {"all": scenes_by_background(args.n, None)}
    if args.bg_split:
        groups.update(light=scenes_by_background(args.n, True), dark=scenes_by_background(args.n, False))
    t0 = time.time()
    print("| pair | scenes | distance | midpoint chroma | margin | target acc | mask IoU | kept PSNR (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    ious, geo = [], []
    for group, seeds in groups.items():
        for src, tgt in pairs:
            g = pair_geometry(src, tgt)
            g["margin"] = background_margin(src, tgt, scene_grays(seeds))
            r = edit(seeds, src, tgt)[1]
            if group == "all":
                ious.append(r["mask_iou"])
                geo.append(g)
            print(f"| {src}->{tgt} | {group} | {g['distance']:.2f} | {g['midpoint_chroma']:.2f} | {g['margin']:+.2f} "
                  f"| {r['target_acc']:.3f} "
                  f"| {r['mask_iou']:.3f} | {r['keep_psnr']:.1f} |", flush=True)
    seeds = groups["all"]
    for src, mid, tgt in vias:
        y1, r1 = edit(seeds, src, mid)
        r2 = edit(seeds, mid, tgt, x=y1, first=src)[1]  # from the first hop's result, scored against the input
        print(f"| {src}->{mid}->{tgt} | all (two edits; first hop IoU {r1['mask_iou']:.3f}) | | | | {r2['target_acc']:.3f} "
              f"| {r2['mask_iou']:.3f} | {r2['keep_psnr']:.1f} |", flush=True)
    if len(ious) > 2:
        print(f"\nSpearman over {len(ious)} pairs: IoU vs distance {spearman([g['distance'] for g in geo], ious):+.2f}, "
              f"vs midpoint chroma {spearman([g['midpoint_chroma'] for g in geo], ious):+.2f}, "
              f"vs margin {spearman([g['margin'] for g in geo], ious):+.2f}")
    print(f"({time.time() - t0:.0f} s, {args.threads} thread(s), teacher {args.teacher}, {args.n} scenes per row)")


if __name__ == "__main__":
    main()
