"""scripts/probe_shape_change.py's ``edit`` probe started at a translator's outputs (``--translator``)."""

from __future__ import annotations


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the probe's output by their first cell."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_edit_starts_at_the_translators_outputs(load_script, shapes_translator_dir, capsys):
    probe = load_script("probe_shape_change")
    args = ["edit", "--guidance", "1.5", "--schedules", "eval", "--n", "4", "--steps", "1", "--lr", "1e-9"]
    probe.main([*args, "--translator", str(shapes_translator_dir), "--by-shape"])
    started = _rows(capsys.readouterr().out)
    probe.main(args)
    from_input = _rows(capsys.readouterr().out)

    edit = "DDS edit, guidance 1.5, t (50, 600)"
    # a vanishing step leaves the edit where it started: at the translator's outputs, or at the inputs
    assert started[f"{edit}, from the translator's outputs"] == started["translator"]
    assert from_input[edit] != started["translator"]
    assert from_input[edit][2] == "0.000"  # the inputs are circles and triangles: no square among them
    # one row per source shape, whose counts add up to the whole set
    n = [int(started[f"translator, {s}"][0]) for s in ("circles", "triangles")]
    assert sum(n) == int(started["translator"][0]) == 4
