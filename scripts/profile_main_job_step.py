#!/usr/bin/env python
"""Where the main job's training step spends its time: cProfile of ``experiment=shapes`` for a few steps.

Runs the real training app in-process (``ddstrans.cli.train``: Lightning, the shapes data module rendering scenes
in the main process, CSV logging, checkpoints) under ``cProfile`` and prints one row per component of the step,
in ms per step and as a share of the loop: the teacher's 4-way CFG call (``dds_grad``), the generator's forward,
the backward, the optimizer update, gradient clipping, EMA, the rest of ``training_step`` (prompt embeddings,
identity term, logging), data loading (rendering) and validation (with ``--steps`` past ``trainer.val_check_interval``).
cProfile adds a cost per Python call, so shares of Python-heavy rows read high; compare rows, and variants run
back to back.

    python scripts/profile_main_job_step.py --steps 60
    python scripts/profile_main_job_step.py --steps 60 optim.optimizer.fused=false   # any Hydra override
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time

# (row, file suffix, function name); cumulative time of each, per step
ROWS = [
    ("teacher 4-way CFG call (dds_grad)", "ddstrans/scores.py", "dds_grad"),
    ("generator forward", "ddstrans/generator.py", "forward"),
    ("backward (generator)", "torch/_tensor.py", "backward"),
    ("optimizer update + closure", "lightning/pytorch/core/optimizer.py", "step"),
    ("closure (step, backward, clipping)", "lightning/pytorch/plugins/precision/precision.py", "_wrap_closure"),
    ("gradient clipping", "lightning/pytorch/core/module.py", "clip_gradients"),
    ("grad-norm logging", "ddstrans/module.py", "on_before_optimizer_step"),
    ("EMA update", "diffusers/training_utils.py", "step"),
    ("training_step", "ddstrans/module.py", "training_step"),
    ("data (render + collate)", "torch/utils/data/dataloader.py", "__next__"),
    ("validation (module + shapes metrics)", "lightning/pytorch/loops/evaluation_loop.py", "run"),
    ("checkpoint writes", "ddstrans/callbacks.py", "save_checkpoint"),
    ("training loop", "lightning/pytorch/loops/training_epoch_loop.py", "run"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(v[3] for (f, _, n), v in stats.stats.items() if n == name and f.endswith(suffix))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=shapes")
    a = p.parse_args()
    from ddstrans.cli.train import compose, train

    with tempfile.TemporaryDirectory() as run:
        cfg = compose(["experiment=shapes", f"trainer.max_steps={a.steps}", "export_after_fit=false",
                       "trainer.enable_progress_bar=false", *a.overrides], run)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        train(cfg)
        prof.disable()
        wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    c = {row: cumulative(st, suffix, name) for row, suffix, name in ROWS}
    # derived rows: what each composite holds beyond its parts
    c["optimizer update (AdamW)"] = c["optimizer update + closure"] - c["closure (step, backward, clipping)"]
    c["rest of training_step (encode, embeddings, identity term, logging)"] = (
        c["training_step"] - c["teacher 4-way CFG call (dds_grad)"] - c["generator forward"])
    loop = c["training loop"]
    show = ["teacher 4-way CFG call (dds_grad)", "generator forward", "backward (generator)",
            "optimizer update (AdamW)", "gradient clipping", "grad-norm logging", "EMA update",
            "rest of training_step (encode, embeddings, identity term, logging)", "data (render + collate)",
            "validation (module + shapes metrics)", "checkpoint writes"]
    print(f"{a.steps} steps, {wall:.1f} s wall (under cProfile), overrides: {' '.join(a.overrides) or 'none'}\n")
    print("| component | ms / step | share of the loop |")
    print("|---|---:|---:|")
    for row in show:
        print(f"| {row} | {1000 * c[row] / a.steps:.0f} | {100 * c[row] / loop:.1f}% |")
    print(f"| training loop (all of the above and Lightning's hooks) | {1000 * loop / a.steps:.0f} | 100% |")


if __name__ == "__main__":
    main()
