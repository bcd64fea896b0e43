"""Routes through trained edits: reach a prompt pair no task names by chaining caption rewrites that tasks do.

Why: a text-conditioned translator trained on single-attribute edits does the edits it was trained on, and
mostly not the pairs it never saw (a red circle made yellow when only red→blue and blue→yellow were trained) nor
two changes at once (docs/experiments/zero-shot-prompt-pairs.md). Each of those is reachable by *trained* steps:
red→blue then blue→yellow; recolour then reshape. A route is the shortest chain of the translator's caption-rewrite
tasks that turns the source prompt into the target prompt; the translator then makes one forward pass per step,
each conditioned on a prompt pair of the kind it was trained on.

Pure string search over ``ddstrans.tasks.Task`` objects, no models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ddstrans.prompts import CAPTION_FIELD

MAX_PASSES = 3  # longest route searched (forward passes); a route of n steps keeps n generators' errors


@dataclass(frozen=True)
class Step:
    """One forward pass of a route: ``task`` rewrites prompt ``source`` into ``target``."""

    task: str
    source: str
    target: str


def rewrite_moves(tasks: Sequence) -> list[tuple[str, int]]:
    """(task name, target variant) of every task that edits a prompt by rewriting it: its source is the prompt
    itself (``"{caption}"``) and its target the prompt rewritten. Tasks with fixed prompts describe no move from an
    arbitrary prompt and take no part in routes."""
    moves = []
    for t in tasks:
        if list(t.source) != [CAPTION_FIELD] or not t.rewrites:
            continue
        moves += [(t.name, v) for v, template in enumerate(t.target) if template == CAPTION_FIELD]
    return moves


def plan_route(source: str, target: str, tasks: Sequence, max_passes: int = MAX_PASSES) -> list[Step] | None:
    """The shortest chain of caption-rewrite tasks from ``source`` to ``target`` (breadth first, ties broken by
    task order): ``[]`` when the prompts are equal, None when no chain of at most ``max_passes`` steps exists."""
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    if source == target:
        return []
    by_name = {t.name: t for t in tasks}
    moves = rewrite_moves(tasks)
    frontier: list[tuple[str, list[Step]]] = [(source, [])]
    seen = {source}
    for _ in range(max_passes):
        nxt = []
        for prompt, path in frontier:
            for name, variant in moves:
                out = by_name[name].target_for(prompt, variant)
                if out in seen:
                    continue
                route = [*path, Step(name, prompt, out)]
                if out == target:
                    return route
                seen.add(out)
                nxt.append((out, route))
        frontier = nxt
    return None
