"""The outline diagnostic (scripts/diagnose_outline.py): where a translation gains and loses mask pixels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ddstrans.shapes import render_scene

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_outline.py"


@pytest.fixture(scope="module")
def outline():
    spec = importlib.util.spec_from_file_location("diagnose_outline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_shape_moved_one_pixel_left_adds_on_the_left_and_misses_on_the_right(outline):
    scenes = [render_scene(s, color="blue") for s in range(4)]
    masks = np.stack([r["mask"] for r in scenes])
    moved = np.stack([np.roll(r["image"], -1, axis=1) for r in scenes])  # one pixel to the left
    rep = outline.outline_report(moved, masks)
    assert rep["shift_x"] == pytest.approx(-1.0, abs=1e-6) and rep["shift_sd_x"] == pytest.approx(0.0, abs=1e-6)
    assert rep["shift_y"] == pytest.approx(0.0, abs=1e-6)
    assert rep["added_left"] == pytest.approx(rep["ring_left"])  # the whole left ring is now shape
    assert rep["added_right"] == 0.0
    # missed on the right side (a one-pixel-wide tip, e.g. a triangle's apex, is missed from both sides)
    assert rep["missed_right"] > 4 * rep["missed_left"] and rep["missed"] == pytest.approx(rep["added"])
    assert rep["iou"] < 0.9


def test_the_answer_itself_has_no_outline_error(outline):
    scenes = [render_scene(s, color="red") for s in range(4)]
    rep = outline.outline_report(np.stack([r["image"] for r in scenes]), np.stack([r["mask"] for r in scenes]))
    assert rep["iou"] == 1.0 and rep["missed"] == 0.0 and rep["added"] == 0.0 and rep["shift_x"] == 0.0
