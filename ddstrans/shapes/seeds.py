"""Named, non-overlapping seed ranges of the shapes world.

A scene is a pure function of its seed (``render_scene(seed)``), so which scenes a model has seen is decided by
which seeds it drew. Every user of the world draws from one of these ranges, and the ranges are disjoint, so no
evaluation input can have been a training scene of the translator or of the teacher.

- ``TRANSLATOR_TRAIN``: training scenes of the translation network (``ShapesDataModule`` uses its first
  ``num_train`` seeds).
- ``HELD_OUT``: evaluation (``ddstrans eval``), rendered example inputs and the teacher's editing check; seen by
  no model in training and by no validation, so what evaluation reports was never used to choose a checkpoint.
- ``VALIDATION``: the inputs validated on while training (``ShapesDataModule``'s validation set, the
  ``ShapesMetrics`` callback): a best checkpoint chosen on their figures (``ModelCheckpoint(monitor=...)``) is
  chosen on inputs evaluation never scores.
- ``TEACHER_TRAIN``: training scenes of the shapes teacher (``ddstrans.shapes.train_teacher``).
"""

from __future__ import annotations

TRANSLATOR_TRAIN = range(0, 10_000_000)
HELD_OUT = range(10_000_000, 19_000_000)
VALIDATION = range(19_000_000, 20_000_000)
TEACHER_TRAIN = range(20_000_000, 2**31 - 1)

RANGES = {"translator_train": TRANSLATOR_TRAIN, "held_out": HELD_OUT, "validation": VALIDATION,
          "teacher_train": TEACHER_TRAIN}


def take(seed_range: range, start: int, n: int) -> range:
    """``n`` seeds of ``seed_range`` from its ``start``-th on; ValueError if they do not fit in it."""
    if start < 0 or n < 0 or start + n > len(seed_range):
        raise ValueError(f"seeds [{start}, {start + n}) of a range of {len(seed_range)} seeds: start and n must fit in it")
    return seed_range[start : start + n]
