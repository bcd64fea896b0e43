"""Image I/O and conversion (PIL/numpy/torch only: no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageReadError(ValueError):
    """An input file that is not a readable image (message names the file and the reason; ``reason`` is the short
    reason alone, for counts by reason)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


# The one limit on declared image size for every reader (translate, edit, make-shards, shard decoding): a header
# may claim any size, and decoding allocates it. PIL's own default (about 9459 x 9459, ~256 MB as RGB), applied
# as a refusal of that one file rather than PIL's warning or exception.
MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def open_checked(source, name: str | None = None, *, draft_size: int | None = None) -> Image.Image:
    """Open and decode one image (a path or bytes) under the common policy; ``ImageReadError`` naming the file
    and the reason for anything unusable: empty, not an image, truncated, or a declared size above
    ``MAX_IMAGE_PIXELS`` (refused from the header, before any pixel is decoded). ``draft_size``: let JPEG decode
    at a reduced scale no smaller than that. The image keeps its mode (see ``to_rgb``)."""
    import io
    import warnings

    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageReadError(f"{label}: empty file", "empty file")
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageReadError(f"{label}: no such file", "no such file")
        if path.stat().st_size == 0:
            raise ImageReadError(f"{label}: empty file", "empty file")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                im.close()
                raise ImageReadError(f"{label}: declared size {w}x{h} exceeds the limit of {MAX_IMAGE_PIXELS} pixels "
                                     "(ddstrans.images.MAX_IMAGE_PIXELS; a decompression bomb?)", "image too large")
            if draft_size and im.format == "JPEG" and min(im.size) >= 2 * draft_size:
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            return im
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{label}: declared size exceeds the limit of {MAX_IMAGE_PIXELS} pixels (a decompression "
                             f"bomb?): {e}", "image too large") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
        raise ImageReadError(f"{label}: not a readable image ({type(e).__name__}: {e})",
                             f"not a readable image ({type(e).__name__})") from None


def load_image(path: str | Path) -> Image.Image:
    """Open any readable image as RGB (grayscale, palette, RGBA, CMYK, 16-bit converted); ``ImageReadError``
    under the policy of ``open_checked``."""
    im = open_checked(path)
    try:
        return to_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})",
                             f"not a readable image ({type(e).__name__})") from None
    finally:
        im.close()


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        im = Image.fromarray((arr / (65535.0 if hi > 255 else 255.0) * 255).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic) and crop the center square."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def pil_to_tensor(images: list[Image.Image] | Image.Image) -> torch.Tensor:
    """PIL RGB image(s) -> float tensor (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    arr = np.stack([np.asarray(to_rgb(im), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Rows of equally sized images -> one grid image (white padding)."""
    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def resize_max_side(im: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (Lanczos) so that the longer side is at most ``max_side``; smaller images are unchanged."""
    w, h = im.size
    if not max_side or max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def save_png(im: Image.Image, out: str | Path) -> None:
    """PNG under a temp name next to ``out``, renamed over it when complete: a full disk or a kill never leaves
    a partial file under the output name."""
    from ddstrans.io_safety import atomic_output

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        im.save(tmp, format="PNG")
