"""The shapes world's seed ranges are disjoint, and each user draws from its own."""

from __future__ import annotations

import itertools

import pytest

from ddstrans.shapes import seeds
from ddstrans.shapes.data import ShapesDataModule
from ddstrans.shapes.defaults import shapes_tasks
from ddstrans.shapes.evaluation import build_eval_set


def test_named_ranges_do_not_overlap():
    for (na, a), (nb, b) in itertools.combinations(seeds.RANGES.items(), 2):
        assert a.step == b.step == 1 and len(a) > 0 and len(b) > 0
        assert a.stop <= b.start or b.stop <= a.start, f"{na} {a} overlaps {nb} {b}"


def test_data_module_trains_and_validates_on_their_ranges():
    dm = ShapesDataModule(batch_size=2, num_train=5, num_val=3)
    dm.setup()
    assert all(s in seeds.TRANSLATOR_TRAIN for s in dm.train_set.seeds)
    assert all(s in seeds.VALIDATION for s in dm.val_set.seeds)
    with pytest.raises(ValueError, match="start and n"):
        ShapesDataModule(num_train=len(seeds.TRANSLATOR_TRAIN) + 1).setup()


def test_evaluation_draws_held_out_inputs_only():
    task = next(t for t in shapes_tasks() if t.name == "to_blue")
    es = build_eval_set(task, 4)
    assert all(s in seeds.HELD_OUT for s in es.seeds)
    with pytest.raises(ValueError, match="HELD_OUT"):
        build_eval_set(task, 4, start_seed=seeds.TRANSLATOR_TRAIN.start)


def test_validation_metrics_never_score_an_evaluation_input():
    # a best checkpoint chosen on the callback's figures must not be chosen on what `ddstrans eval` reports
    from types import SimpleNamespace

    from ddstrans.shapes.callback import ShapesMetrics

    tasks = shapes_tasks()
    sets = ShapesMetrics(n=8)._eval_sets(SimpleNamespace(task_table=SimpleNamespace(tasks=tasks)))
    assert sorted(sets) == sorted(t.name for t in tasks)
    for task in tasks:
        val = set(sets[task.name].seeds)
        assert len(val) == 8 and all(s in seeds.VALIDATION for s in val)
        assert not val & set(build_eval_set(task, 64).seeds)


def test_teacher_training_scenes_come_from_the_teacher_range():
    import numpy as np

    from ddstrans.shapes.train_teacher import scene_seeds

    drawn = scene_seeds(np.random.default_rng([0, 3]), 256)
    assert len(drawn) == 256 and all(int(s) in seeds.TEACHER_TRAIN for s in drawn)


def test_teacher_evaluation_edits_held_out_scenes_with_the_reference_settings():
    from ddstrans.editing import EditConfig
    from ddstrans.shapes import eval_teacher

    args = eval_teacher.parse_args([])
    ref = EditConfig()
    assert (args.steps, args.lr, args.guidance, (args.t_min, args.t_max)) == (ref.steps, ref.lr, ref.guidance, ref.t_range)
    assert args.start_seed in seeds.HELD_OUT and args.start_seed + 1000 * 4 + args.n in seeds.HELD_OUT
