"""Per-image prompts: templates filled with an image's caption, and word rewrites.

Why: a fixed prompt pair ("a photo of a cat" → "a photo of a lion") ignores what else is in the image.
When the data carries captions, a task can describe each image exactly — source ``"{caption}"`` and
target ``"{caption}"`` with a rewrite (e.g. every color word → "blue") — and DDS then edits only what the
rewrite changes. Pure string functions, no models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CAPTION_FIELD = "{caption}"


def uses_caption(template: str) -> bool:
    return CAPTION_FIELD in template


def fill(template: str, caption: str | None) -> str:
    """Insert ``caption`` where the template says ``{caption}`` (other braces are left alone)."""
    if not uses_caption(template):
        return template
    if caption is None:
        raise ValueError(f"prompt {template!r} needs the image's caption, but the batch carries none")
    return template.replace(CAPTION_FIELD, caption)


@dataclass(frozen=True)
class Rewrite:
    """Replace every match of ``pattern`` (a regular expression, whole words advised: ``\\b(red|blue)\\b``)."""

    pattern: str
    replacement: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid rewrite pattern {self.pattern!r}: {e}") from None

    def __call__(self, text: str) -> str:
        return re.sub(self.pattern, self.replacement, text)
