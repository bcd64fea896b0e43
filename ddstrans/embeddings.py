"""Prompt embeddings of any teacher family as one object.

Why: SD 1.x/2.x condition on one tensor of token states, SDXL adds a pooled vector, SD3 joins CLIP and T5 tokens
and a pooled vector, Flux takes T5 tokens and a CLIP pooled vector. The task table, the prompt cache, the training
module, per-image editing and export only index, concatenate, save and move embeddings; ``PromptEmbeddings`` lets
them do that without knowing which family made them. A plain tensor (SD 1.x/2.x) is the one-field case, and the
helpers below treat both alike.

Every field shares the leading (batch) dimensions; ``hidden`` is the token sequence a cross-attention network sees
(a text-conditioned generator reads it), other fields (``pooled``) ride along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

HIDDEN = "hidden"


class PromptEmbeddings:
    """Named tensors with common leading dimensions: ``hidden`` (..., L, D) and e.g. ``pooled`` (..., P).

    Indexing, ``torch.cat`` / ``torch.stack`` (dim 0), ``to``, ``float``, ``cpu``, ``clone`` act on every field.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, torch.Tensor] | None = None, **kw: torch.Tensor):
        fields = {**dict(fields or {}), **kw}
        if HIDDEN not in fields:
            raise ValueError(f"PromptEmbeddings needs a {HIDDEN!r} field, got {sorted(fields)}")
        n = fields[HIDDEN].shape[0] if fields[HIDDEN].ndim else None
        for k, v in fields.items():
            if not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] != n:
                raise ValueError(f"PromptEmbeddings field {k!r} must be a tensor with leading size {n}")
        self.fields = fields

    # ------------------------------------------------------------------ fields
    @property
    def hidden(self) -> torch.Tensor:
        return self.fields[HIDDEN]

    @property
    def pooled(self) -> torch.Tensor | None:
        return self.fields.get("pooled")

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "fields")[name]
        except KeyError:
            raise AttributeError(f"PromptEmbeddings has no field {name!r}") from None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def __repr__(self) -> str:
        return "PromptEmbeddings(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.fields.items()) + ")"

    # ------------------------------------------------------------------ tensor-like operations
    def map(self, fn) -> PromptEmbeddings:
        return PromptEmbeddings({k: fn(v) for k, v in self.fields.items()})

    def __getitem__(self, index) -> PromptEmbeddings:
        return self.map(lambda v: v[index])

    def __setitem__(self, index, value: PromptEmbeddings) -> None:
        if set(value.fields) != set(self.fields):
            raise ValueError(f"cannot assign embeddings with fields {sorted(value.fields)} to {sorted(self.fields)}")
        for k, v in self.fields.items():
            v[index] = value.fields[k].to(v)

    def to(self, *args, device=None, dtype=None, **_) -> PromptEmbeddings:
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or keywords; dtype casts floating fields only."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif a is not None:
                device = a
        return self.map(lambda v: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point()
                                       else None))

    def float(self) -> PromptEmbeddings:
        return self.to(dtype=torch.float32)

    def cpu(self) -> PromptEmbeddings:
        return self.to(device="cpu")

    def clone(self) -> PromptEmbeddings:
        return self.map(torch.Tensor.clone)

    def detach(self) -> PromptEmbeddings:
        return self.map(torch.Tensor.detach)

    def contiguous(self) -> PromptEmbeddings:
        return self.map(torch.Tensor.contiguous)

    def expand_batch(self, n: int) -> PromptEmbeddings:
        """A batch of ``n`` from a batch of 1 (views, no copy)."""
        return self.map(lambda v: v.expand(n, *v.shape[1:]))

    def equal(self, other: PromptEmbeddings) -> bool:
        return set(self.fields) == set(other.fields) and all(torch.equal(v, other.fields[k]) for k, v in self.fields.items())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.stack):
            seq = list(args[0])
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0:
                raise ValueError(f"PromptEmbeddings concatenate along dim 0 only, got dim={dim}")
            keys = list(seq[0].fields)
            if any(list(e.fields) != keys for e in seq):
                raise ValueError("cannot concatenate embeddings with different fields")
            return PromptEmbeddings({k: func([e.fields[k] for e in seq], dim=0) for k in keys})
        return NotImplemented

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``{prefix + "." + field: tensor}`` (safetensors-ready: CPU, contiguous)."""
        return {f"{prefix}.{k}" if prefix else k: v.detach().cpu().contiguous() for k, v in self.fields.items()}


Embeddings = torch.Tensor | PromptEmbeddings


def flatten(emb: Embeddings, prefix: str) -> dict[str, torch.Tensor]:
    """Embeddings as flat named tensors: a tensor under ``prefix`` itself, ``PromptEmbeddings`` as ``prefix.field``."""
    if isinstance(emb, PromptEmbeddings):
        return emb.state_dict(prefix)
    return {prefix: emb.detach().cpu().contiguous()}


def unflatten(tensors: Mapping[str, torch.Tensor], prefix: str) -> Embeddings:
    """Inverse of :func:`flatten` (KeyError naming ``prefix`` when neither form is there)."""
    if prefix in tensors:
        return tensors[prefix]
    fields = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not fields:
        raise KeyError(f"no embeddings named {prefix!r}")
    return PromptEmbeddings(fields)


def expand_batch(emb: Embeddings, n: int) -> Embeddings:
    """A batch of ``n`` from a batch of 1 (a batch of ``n`` is returned as it is)."""
    if len(emb) == n:
        return emb
    if isinstance(emb, PromptEmbeddings):
        return emb.expand_batch(n)
    return emb.expand(n, *emb.shape[1:])


def hidden_states(emb: Embeddings) -> torch.Tensor:
    """The token sequence a cross-attention network reads."""
    return emb.hidden if isinstance(emb, PromptEmbeddings) else emb


def stack(embs: Sequence[Embeddings]) -> Embeddings:
    return torch.stack(list(embs))


def embeddings_equal(a: Embeddings, b: Embeddings) -> bool:
    if isinstance(a, PromptEmbeddings) or isinstance(b, PromptEmbeddings):
        return isinstance(a, PromptEmbeddings) and isinstance(b, PromptEmbeddings) and a.equal(b)
    return torch.equal(a, b)
