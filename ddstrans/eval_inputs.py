"""Evaluation inputs on real images: a folder or shards of inputs, paired folders (masks, precomputed outputs of
another method), and unpaired target-domain images for FID/KID.

Images are resized (short side) and center-cropped to the evaluation resolution and kept as uint8 (a thousand
512-px images take 0.8 GB instead of 3 GB as floats). Unreadable files are skipped and listed, never fatal;
a folder with no images, or a paired folder that does not match the inputs one-to-one by file stem, is one
``ValueError`` line naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddstrans.images import IMAGE_SUFFIXES, ImageReadError, load_image, resize_center_crop


@dataclass
class ImageSet:
    """``pixels`` uint8 (N, 3, H, W); ``names`` file stems (or shard keys); ``captions`` (or None each)."""

    pixels: torch.Tensor
    names: list[str]
    captions: list[str | None]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __len__(self) -> int:
        return len(self.names)

    def floats(self, sl=slice(None)) -> torch.Tensor:
        """Images ``sl`` in [-1, 1] float32 (as ``ddstrans.images.pil_to_tensor``)."""
        return self.pixels[sl].float() / 127.5 - 1.0


def image_files(folder: str | Path, param: str = "images") -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{param}={folder}: no such directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{param}={folder}: no images there ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _to_uint8(im, resolution: int | None) -> torch.Tensor:
    if resolution:
        im = resize_center_crop(im, resolution)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def load_folder(folder: str | Path, resolution: int | None, *, limit: int = 0, param: str = "images") -> ImageSet:
    """Readable images of ``folder`` in file-name order (at most ``limit``); ``NAME.txt`` beside an image is its
    caption (per-image tasks fill their prompts from it)."""
    pixels, names, captions, skipped = [], [], [], []
    for path in image_files(folder, param):
        if limit and len(names) >= limit:
            break
        try:
            im = load_image(path)
        except ImageReadError as e:
            skipped.append((str(path), str(e).split(": ", 1)[-1]))
            continue
        x = _to_uint8(im, resolution)
        if pixels and x.shape != pixels[0].shape:
            skipped.append((str(path), f"size {tuple(x.shape[1:])} differs from the first image's; pass a resolution"))
            continue
        pixels.append(x)
        names.append(path.stem)
        txt = path.with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.is_file() else None)
    if not pixels:
        raise ValueError(f"{param}={folder}: none of its {len(skipped)} image files is readable "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    return ImageSet(torch.stack(pixels), names, captions, skipped)


def load_shards(pattern: str, resolution: int, *, limit: int = 0, param: str = "shards") -> ImageSet:
    """The first ``limit`` usable samples of webdataset shards, in order (bad samples skipped and listed)."""
    from ddstrans.data.shards import OrderedShardReader, expand_urls

    reader = OrderedShardReader(expand_urls(pattern), resolution=resolution, batch_size=1, limit=limit)
    reader.pixels_uint8 = True
    pixels, names, captions = [], [], []
    for _, s in reader.samples():
        pixels.append(s["pixels"])
        names.append(s["key"])
        captions.append(s.get("caption") or None)
    skipped = [(f"{pattern} ({n} sample(s))", reason) for reason, n in reader.stats.as_dict().items()]
    if not pixels:
        raise ValueError(f"{param}={pattern}: no usable samples")
    return ImageSet(torch.stack(pixels), names, captions, skipped)


def load_paired(folder: str | Path, inputs: ImageSet, *, param: str, mask: bool = False) -> torch.Tensor:
    """Images of ``folder`` matched to ``inputs`` by file stem, at the inputs' size: uint8 (N, 3, H, W), or for
    ``mask`` float (N, 1, H, W) in {0, 1} (gray > 127: the region the edit may change)."""
    files = {p.stem: p for p in image_files(folder, param)}
    missing = [n for n in inputs.names if n not in files]
    if missing or len(files) != len(inputs):
        extra = sorted(set(files) - set(inputs.names))
        raise ValueError(f"{param}={folder}: {len(files)} images for {len(inputs)} inputs, paired by file name "
                         f"(missing: {', '.join(missing[:3]) or 'none'}; unmatched: {', '.join(extra[:3]) or 'none'})")
    size = tuple(inputs.pixels.shape[-2:])
    out = []
    for n in inputs.names:
        try:
            im = load_image(files[n])
        except ImageReadError as e:
            raise ValueError(f"{param}: {e}") from None
        if im.size != (size[1], size[0]):
            im = resize_center_crop(im, size[0]) if size[0] == size[1] else im.resize((size[1], size[0]))
        if mask:
            out.append(torch.from_numpy(np.array(im.convert("L")) > 127).float()[None])
        else:
            out.append(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1))
    return torch.stack(out)
