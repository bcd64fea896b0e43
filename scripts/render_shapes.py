#!/usr/bin/env python
"""Write held-out shapes-world scenes as PNG files (inputs for `ddstrans translate`).

    python scripts/render_shapes.py OUT_DIR --n 8 [--scale 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ddstrans.shapes import render_scene
from ddstrans.shapes.seeds import HELD_OUT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--start-seed", type=int, default=HELD_OUT.start + 500_000,
                   help="first seed (default: in ddstrans.shapes.seeds.HELD_OUT, seen by no model in training)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        seed = args.start_seed + i
        scene = render_scene(seed)
        img = Image.fromarray((np.clip(scene["image"], 0, 1) * 255).round().astype(np.uint8))
        img.save(args.out / f"scene_{seed}.png")
        (args.out / f"scene_{seed}.txt").write_text(scene["caption"] + "\n")
    print(f"wrote {args.n} scenes to {args.out}")


if __name__ == "__main__":
    main()
