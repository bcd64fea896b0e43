#!/usr/bin/env python
"""The PREDICTED memory table of docs/performance.md, from the memory model (``ddstrans.memory``).

Peak ``torch.cuda.max_memory_allocated`` of one DDS training step (GiB), bf16 autocast, for SD 1.5 and SDXL at 512 and
1024 px, batch 1 and 4, the full and the LoRA generator, and saver combinations. Nothing is allocated: the models run
on the meta device (a few minutes of CPU for the whole table).

    scripts/memory_table.py            # markdown table on stdout
    scripts/memory_table.py --json t.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

# column: (label, Setting overrides)
COMBOS = [
    ("fp32 teacher, no savers", dict(teacher_dtype="fp32", gradient_checkpointing=False, attention="eager")),
    ("bf16 teacher", dict(gradient_checkpointing=False, attention="eager")),
    ("+ SDPA", dict(gradient_checkpointing=False)),
    ("+ grad. ckpt", dict()),
    ("+ 8-bit AdamW + cached latents", dict(optimizer="adamw8bit", cached_latents=True)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sdxl")
    ap.add_argument("--resolutions", default="512,1024")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from ddstrans.memory import Setting, parameter_counts, predict

    rows = []
    print("| model | px | batch | generator | " + " | ".join(c[0] for c in COMBOS) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(COMBOS))
    for arch in args.archs.split(","):
        counts = parameter_counts(arch)
        for res in map(int, args.resolutions.split(",")):
            for batch in map(int, args.batches.split(",")):
                for gen in ("full", "lora"):
                    base = Setting(arch=arch, resolution=res, batch=batch, generator=gen)
                    cells = []
                    for label, over in COMBOS:
                        r = predict(replace(base, **over), counts)
                        rows.append({**r["setting"], "combo": label, "predicted_gib": round(r["peak_gib"], 2)})
                        cells.append(f"{r['peak_gib']:.1f}")
                    print(f"| {'SD 1.5' if arch == 'sd15' else 'SDXL'} | {res} | {batch} | {gen} | "
                          + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
