"""Tasks as source/target prompt pairs, and their cached teacher embeddings.

A ``Task`` has a name and one or more source and target prompt variants; each training step samples one
variant per sample. ``TaskTable`` holds the embeddings of every variant as padded tensors
``(T, V, L, D)`` (or ``PromptEmbeddings`` with those leading dimensions: SDXL, SD3, Flux) plus variant counts, computed once with the teacher's text encoder (which caches them on disk
too). The table saves to ``tasks.safetensors`` (tensors) + a JSON-able dict (names, prompts) for export.

A task may also describe each image by its caption (``source: "{caption}"``) and derive the target with a
``rewrite`` (a regular expression and its replacement, e.g. every color word -> "blue"; or a list of them, applied
in order, for an edit of several attributes at once): a *per-image* task.
Its prompts are filled per sample from the batch's ``caption`` and encoded through the teacher's cache;
the table then holds the template's embedding as a placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ddstrans.embeddings import flatten, unflatten
from ddstrans.prompts import Rewrite, fill, uses_caption


@dataclass
class Task:
    name: str
    source: list[str]
    target: list[str]
    rewrite: dict | list[dict] | None = None  # {pattern, replacement} or a list of them: applied to the filled target

    def __post_init__(self):
        self.source = [self.source] if isinstance(self.source, str) else list(self.source)
        self.target = [self.target] if isinstance(self.target, str) else list(self.target)
        if not self.name or not self.source or not self.target:
            raise ValueError(f"task {self.name!r} needs a name and at least one source and one target prompt")
        if self.rewrite is not None:
            many = not isinstance(self.rewrite, Mapping)
            self.rewrite = [dict(r) for r in self.rewrite] if many else dict(self.rewrite)
            for r in self.rewrites:
                if set(r) != {"pattern", "replacement"}:
                    raise ValueError(f"task {self.name!r}: rewrite needs exactly 'pattern' and 'replacement'")
                Rewrite(**r)  # validates the pattern
            if many and not self.rewrite:
                raise ValueError(f"task {self.name!r}: rewrite is an empty list (leave it out for no rewrite)")

    @property
    def rewrites(self) -> list[dict]:
        """The rewrites in the order they apply (one for a single ``{pattern, replacement}``)."""
        if self.rewrite is None:
            return []
        return [self.rewrite] if isinstance(self.rewrite, dict) else list(self.rewrite)

    @property
    def per_image(self) -> bool:
        """True when the prompts depend on each image's caption."""
        return any(uses_caption(p) for p in (*self.source, *self.target))

    def source_for(self, caption: str | None, variant: int = 0) -> str:
        return fill(self.source[variant % len(self.source)], caption)

    def target_for(self, caption: str | None, variant: int = 0) -> str:
        text = fill(self.target[variant % len(self.target)], caption)
        for r in self.rewrites:
            text = Rewrite(**r)(text)
        return text


def as_tasks(items: Iterable) -> list[Task]:
    """Tasks from dicts/DictConfigs ``{name, source, target}`` (or ``Task`` objects); names must be unique."""
    tasks = [t if isinstance(t, Task) else Task(str(t["name"]), t["source"], t["target"], t.get("rewrite"))
             for t in items]
    names = [t.name for t in tasks]
    if not tasks:
        raise ValueError("at least one task is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tasks


def _pad_variants(embs: list) -> tuple:
    """List of (V_i, L, D) -> (T, Vmax, L, D) padded by repeating the first variant, and counts (T,)."""
    vmax = max(len(e) for e in embs)
    out = torch.stack([e[[*range(len(e)), *([0] * (vmax - len(e)))]] for e in embs])
    return out, torch.tensor([len(e) for e in embs])


@dataclass
class TaskTable:
    tasks: list[Task]
    source: torch.Tensor  # (T, V, L, D) float32, or PromptEmbeddings with leading (T, V)
    target: torch.Tensor  # (T, V, L, D)
    n_source: torch.Tensor  # (T,)
    n_target: torch.Tensor  # (T,)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, tasks: Iterable, teacher) -> TaskTable:
        """Encode every prompt variant with the teacher (memory + disk cached by the teacher)."""
        tasks = as_tasks(tasks)
        src, tgt = [], []
        for t in tasks:
            src.append(teacher.encode_prompts(t.source).float().cpu())
            tgt.append(teacher.encode_prompts(t.target).float().cpu())
        s, ns = _pad_variants(src)
        g, ng = _pad_variants(tgt)
        meta = {"teacher": getattr(teacher, "source", None)}
        return cls(tasks, s, g, ns, ng, meta)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(self.names)}") from None

    def to(self, device=None, dtype=None) -> TaskTable:
        self.source = self.source.to(device=device, dtype=dtype)
        self.target = self.target.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ sampling
    def sample(self, task_ids: torch.Tensor, generator: torch.Generator | None = None):
        """One random source and target variant per sample: (B, L, D) each."""
        ids = task_ids.cpu()
        u = torch.rand(2, ids.shape[0], generator=generator)
        vs = (u[0] * self.n_source[ids]).long()
        vt = (u[1] * self.n_target[ids]).long()
        dev = self.source.device
        return self.source[ids.to(dev), vs.to(dev)], self.target[ids.to(dev), vt.to(dev)]

    @property
    def per_image(self) -> bool:
        return any(t.per_image for t in self.tasks)

    def embeddings_for(self, task_ids: torch.Tensor, captions, teacher, generator: torch.Generator | None = None):
        """Per-sample (source, target) embeddings: sampled variants of fixed prompts, and for per-image tasks
        the prompts filled with each sample's caption (encoded through the teacher's prompt cache).
        ``generator=None`` takes the first variant (validation, export)."""
        src, tgt = self.sample(task_ids, generator) if generator is not None else self.first(task_ids)
        if not self.per_image:
            return src, tgt
        ids = task_ids.tolist()
        rows = [i for i, k in enumerate(ids) if self.tasks[k].per_image]
        if not rows:
            return src, tgt
        if captions is None:
            names = sorted({self.tasks[ids[i]].name for i in rows})
            raise ValueError(f"task(s) {', '.join(names)} fill their prompts from each image's caption, "
                             "but the batch has no 'caption'")
        src_p = [self.tasks[ids[i]].source_for(captions[i]) for i in rows]
        tgt_p = [self.tasks[ids[i]].target_for(captions[i]) for i in rows]
        enc = teacher.encode_prompts(src_p + tgt_p).to(device=src.device, dtype=src.dtype)
        src, tgt = src.clone(), tgt.clone()
        index = torch.tensor(rows, device=src.device)
        src[index], tgt[index] = enc[: len(rows)], enc[len(rows) :]
        return src, tgt

    def first(self, task_ids: torch.Tensor):
        """The first (canonical) variant per sample: used for validation and export."""
        ids = task_ids.to(self.source.device)
        return self.source[ids, 0], self.target[ids, 0]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Names, prompts, metadata (JSON-able)."""
        return {"tasks": [asdict(t) for t in self.tasks], "meta": dict(self.meta)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **flatten(self.source.detach().float(), "source"),
            **flatten(self.target.detach().float(), "target"),
            "n_source": self.n_source.cpu().contiguous(),
            "n_target": self.n_target.cpu().contiguous(),
        }

    @classmethod
    def from_parts(cls, info: Mapping, tensors: Mapping[str, torch.Tensor]) -> TaskTable:
        tasks = as_tasks(info["tasks"])
        table = cls(tasks, unflatten(tensors, "source").float(), unflatten(tensors, "target").float(),
                    tensors["n_source"].long(), tensors["n_target"].long(), dict(info.get("meta", {})))
        if len(table.source) != len(tasks) or len(table.target) != len(tasks):
            raise ValueError(f"task table has {len(tasks)} tasks but embeddings for {len(table.source)}")
        return table

    def save(self, tensors_path: str | Path, json_path: str | Path | None = None) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors(), str(tensors_path), metadata={"format": "ddstrans.tasks/1"})
        if json_path is not None:
            Path(json_path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, tensors_path: str | Path, info: Mapping | str | Path) -> TaskTable:
        from safetensors.torch import load_file

        if not isinstance(info, Mapping):
            info = json.loads(Path(info).read_text())
        return cls.from_parts(info, load_file(str(tensors_path)))
