"""One shard sample -> one training sample: image decoding and checks, optional latents, caption, collation.

Bad data never crashes: corrupt or truncated images, members without an image, tiny images and latents of the
wrong shape are skipped and counted by ``SkipCounter``, with a rate-limited warning naming the shard, key and
reason. The streams that feed these functions are in ``ddstrans.data.shards``.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

from ddstrans.images import pil_to_tensor, resize_center_crop, to_rgb

log = logging.getLogger("ddstrans.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
LATENT_EXT = "latents.npy"


# ---------------------------------------------------------------------------------------------- skips
class SkipCounter:
    """Counts skipped or repaired samples by reason; warns for the first few and then every 100th."""

    def __init__(self, name: str = "loader", warn_first: int = 10):
        self.name = name
        self.counts: Counter[str] = Counter()
        self.warn_first = warn_first

    @property
    def total(self) -> int:
        return sum(v for k, v in self.counts.items() if not k.startswith("repaired:"))

    def skip(self, reason: str, where: str = "") -> None:
        self.counts[reason] += 1
        n = self.total
        if n <= self.warn_first or n % 100 == 0:
            log.warning("%s: skipped %s (%s); %d skipped so far: %s", self.name, where or "sample", reason, n, dict(self.counts))

    def note(self, what: str) -> None:
        """A sample that was used after a fix (e.g. missing caption -> empty)."""
        self.counts[f"repaired:{what}"] += 1

    def handler(self, exn: Exception) -> bool:
        """A webdataset ``handler``: count the exception and continue."""
        where = " ".join(str(a) for a in exn.args[1:] if isinstance(a, str))[:200]
        self.skip(f"unreadable shard or member ({type(exn).__name__})", where)
        return True

    def as_dict(self) -> dict:
        return dict(self.counts)


# ---------------------------------------------------------------------------------------------- decoding
def _image_member(sample: dict) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTS:
        if ext in sample and sample[ext] is not None:
            return ext, sample[ext]
    return None


def decode_image_bytes(data: bytes, resolution: int | None, min_size: int = 0) -> Image.Image:
    """Image bytes -> RGB PIL, resized (short side) and center-cropped to ``resolution`` when given.

    Raises ``ValueError`` with the reason for unusable data.
    """
    from ddstrans.images import ImageReadError, open_checked

    if not data:
        raise ValueError("empty image member")
    try:  # the common policy (ddstrans.images); JPEG decoded at a reduced DCT scale (>= resolution)
        im = open_checked(data, "image member", draft_size=resolution)
    except ImageReadError as e:
        raise ValueError(e.reason.replace("not a readable image", "corrupt or unreadable image")) from None
    if min(im.size) < max(1, min_size):
        raise ValueError(f"image too small ({im.size[0]}x{im.size[1]} < {min_size})")
    im = to_rgb(im)
    return resize_center_crop(im, resolution) if resolution else im


def decode_sample(
    sample: dict,
    *,
    resolution: int,
    use_latents: bool = False,
    latent_shape: tuple[int, int, int] | None = None,
    min_size: int = 0,
    stats: SkipCounter | None = None,
    uint8: bool = False,
) -> dict | None:
    """One raw webdataset sample -> ``{"pixels": (3,H,W) | "latents": (C,h,w), "caption", "key"}`` or None.

    ``pixels`` are float32 in [-1, 1], or uint8 in [0, 255] with ``uint8=True`` (see ``pixels_to_float``).
    """
    stats = stats or SkipCounter()
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}:{key}"
    out: dict = {"key": f"{os.path.basename(str(sample.get('__url__', '')))}/{key}"}
    if use_latents:
        raw = sample.get(LATENT_EXT)
        if raw is None:
            stats.skip("no latents member", where)
            return None
        try:
            z = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            stats.skip(f"unreadable latents ({type(e).__name__})", where)
            return None
        if latent_shape is not None and tuple(z.shape) != tuple(latent_shape):
            stats.skip(f"latent shape {tuple(z.shape)} != {tuple(latent_shape)}", where)
            return None
        z = torch.from_numpy(z.astype(np.float32))
        if not torch.isfinite(z).all():
            stats.skip("non-finite latents", where)
            return None
        out["latents"] = z
    else:
        member = _image_member(sample)
        if member is None:
            stats.skip("no image member", where)
            return None
        try:
            im = decode_image_bytes(member[1], resolution, min_size)
        except ValueError as e:
            stats.skip(str(e), where)
            return None
        out["pixels"] = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1) if uint8 else pil_to_tensor(im)[0]
    txt = sample.get("txt")
    if txt is None:
        stats.note("missing caption")
        out["caption"] = ""
    else:
        try:
            out["caption"] = txt.decode("utf-8").strip() if isinstance(txt, bytes) else str(txt).strip()
        except UnicodeDecodeError:
            stats.note("undecodable caption")
            out["caption"] = ""
    return out


def pixels_to_float(batch: dict) -> dict:
    """uint8 ``pixels`` in [0, 255] -> float32 in [-1, 1] (exactly as ``pil_to_tensor``); others unchanged."""
    x = batch.get("pixels")
    if x is not None and x.dtype == torch.uint8:
        batch["pixels"] = x.float() / 127.5 - 1.0
    return batch


def collate(samples: list[dict]) -> dict:
    """List of decoded samples -> batch dict (the ``ddstrans.data`` contract)."""
    batch: dict = {}
    for k in ("pixels", "latents"):
        if k in samples[0]:
            batch[k] = torch.stack([s[k] for s in samples])
    batch["caption"] = [s["caption"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    return batch
