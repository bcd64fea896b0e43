"""Per-image metrics in the torchmetrics style, and the one convention every ddstrans metric follows.

Images are float tensors ``(B, 3, H, W)`` in ``[-1, 1]`` (the project's convention: ``ddstrans.images``);
prompts are lists of strings; masks are ``(B, 1, H, W)`` with 1 where the edit may change the image.

Why per-image values are kept (a ``cat`` state) instead of a running sum: a report gives the mean with its
95% confidence interval, and that needs the spread. A value may also be *undefined* for one image (directional
CLIP when the image did not change): such images are counted in ``undefined`` and left out of the mean, so one
identity output cannot turn a mean into NaN.

``needs`` names the batch fields a metric reads; ``update_from(batch)`` passes exactly those, so an evaluation
loop can feed any set of metrics from one dict ``{"inputs", "outputs", "source_prompts", "target_prompts",
"masks"}``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

BATCH_FIELDS = ("inputs", "outputs", "source_prompts", "target_prompts", "masks")


class MetricUnavailable(ValueError):
    """A metric that cannot run here (a model not given, a package missing); the message is one line.
    ``param`` names what would provide it (``clip``, ``dino``, ...), for a front end to name its own flag."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PerImageMetric(Metric):
    """Base class: subclasses compute one value per image in ``score(...)`` (NaN where undefined)."""

    needs: tuple[str, ...] = ()
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("undefined", default=torch.tensor(0), dist_reduce_fx="sum")

    def score(self, *args) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, *args) -> None:
        v = self.score(*args).detach().double().flatten()
        ok = torch.isfinite(v)
        self.undefined += int((~ok).sum())
        self.values.append(v[ok])

    def update_from(self, batch: dict) -> None:
        missing = [k for k in self.needs if batch.get(k) is None]
        if missing:
            raise MetricUnavailable(f"{type(self).__name__} needs {', '.join(missing)} in the batch")
        self.update(*(batch[k] for k in self.needs))

    def per_image(self) -> torch.Tensor:
        """The defined per-image values seen so far (float64)."""
        return dim_zero_cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> torch.Tensor:
        """Mean over images with a defined value (NaN only when no image has one)."""
        v = self.per_image()
        return v.mean() if v.numel() else torch.tensor(float("nan"), dtype=torch.float64)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32 (clamped: a network may overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)
