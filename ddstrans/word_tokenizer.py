"""Build a small CLIP tokenizer whose vocabulary is a fixed list of words.

Why: tiny teachers (tests, the shapes world) need a real ``CLIPTokenizer`` that loads with
``from_pretrained`` like Stable Diffusion's, but the real vocabulary cannot be downloaded here.
Every byte is a token (so any text tokenizes), and each listed word is merged into one token.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def make_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer in which each of ``words`` is a single token."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words if w}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
