"""The webdataset DataModule: roundtrip, bad data, splitting over ranks x workers, cached latents."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.data.shards import ShardDataModule, expand_urls
from ddstrans.data.writer import find_images, write_from_folder
from ddstrans.images import load_image, pil_to_tensor, resize_center_crop, resize_max_side


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i in range(n):
        h, w = 20 + 3 * i, 30 - i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / ("sub" if i % 2 else ".") / f"im{i}.png")
    (root / "im0.txt").write_text("a photo of a cat\n")
    return root


def _write_shards(out, sizes, seed=0):
    """Shards with the given sample counts (16x16 random PNGs, caption = key) + a manifest."""
    import json

    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {"shards": {}, "resolution": None, "latents": False}
    k = 0
    for s, n in enumerate(sizes):
        name = f"shards-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for _ in range(n):
                w.write({"__key__": f"{k:08d}", "png": _png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), "txt": f"{k:08d}"})
                k += 1
        manifest["shards"][name] = {"count": n}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return f"{out}/shards-{{000000..{len(sizes) - 1:06d}}}.tar"


def _dm(urls, **kw):
    base = dict(urls=urls, batch_size=2, num_workers=0, resolution=16, downsample_factor=2, val_samples=0,
                shuffle_buffer=0, resampled=False, pin_memory=False)
    base.update(kw)
    return ShardDataModule(**base)


def _keys(dm):
    return [k for b in dm.train_dataloader() for k in b["key"]]


def test_folder_roundtrip_equals_source_after_same_resize(tmp_path):
    src = _folder(tmp_path / "src")
    out = tmp_path / "shards"
    m = write_from_folder(src, out, max_side=24, image_format="png", min_size=8, maxcount=4, progress=False)
    assert m["count"] == 6 and m["num_shards"] == 2 and m["missing_captions"] == 5
    images, _ = find_images(src)
    dm = _dm(str(out), batch_size=1, batches_per_epoch=6)
    seen = {}
    for b in dm.train_dataloader():
        key = b["key"][0].split("/")[1]
        seen[key] = (b["pixels"][0], b["caption"][0])
    assert len(seen) == 6
    for i, path in enumerate(images):
        expected = pil_to_tensor(resize_center_crop(resize_max_side(load_image(path), 24), 16))[0]
        pixels, caption = seen[f"{i:08d}"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert torch.equal(pixels, expected), path
        assert caption == ("a photo of a cat" if path.name == "im0.png" else "")


def test_corrupt_and_non_image_members_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(1)
    good = [_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    with wds.TarWriter(str(tmp_path / "shards-000000.tar")) as w:
        w.write({"__key__": "a", "png": good[0], "txt": "ok"})
        w.write({"__key__": "b", "jpg": b"\xff\xd8\xff garbage, not a jpeg"})
        w.write({"__key__": "c", "bin": b"\x00\x01 not an image at all", "txt": "orphan caption"})
        w.write({"__key__": "d", "png": good[1][: len(good[1]) // 2]})  # truncated
        w.write({"__key__": "e", "png": _png(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8))})  # tiny
        w.write({"__key__": "f", "png": _png(rng.integers(0, 255, (16, 16), dtype=np.uint8))})  # grayscale
        w.write({"__key__": "g", "png": good[2]})
    (tmp_path / "shards-000001.tar").write_bytes(b"this is not a tar file" * 10)  # unreadable shard
    dm = _dm(str(tmp_path / "shards-{000000..000001}.tar"), batch_size=1, batches_per_epoch=3, min_size=8,
             resampled=True)
    keys = [k.split("/")[1] for k in _keys(dm)]
    assert len(keys) == 3 and set(keys) <= {"a", "f", "g"}
    skipped = dm.skipped
    assert skipped.get("no image member", 0) >= 1
    assert sum(v for k, v in skipped.items() if k.startswith("corrupt")) >= 2  # garbage jpg + truncated png
    assert sum(v for k, v in skipped.items() if k.startswith("image too small")) >= 1
    assert dm.train_stream.stats.total >= 4


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nope-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="nope-"):
        expand_urls(pattern)
    with pytest.raises(FileNotFoundError, match=r"no shard matches .*nope-\{000000\.\.000003\}"):
        _dm(pattern, batches_per_epoch=1).setup()


def test_resolution_must_be_multiple_of_vae_factor(tmp_path):
    urls = _write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="multiple of the teacher's VAE downsample factor 8"):
        ShardDataModule(urls=urls, resolution=500, batch_size=1, num_workers=0).setup()


def _rank_keys(urls, rank, **kw):
    dm = _dm(urls, rank=rank, world_size=2, num_workers=2, batch_size=3, persistent_workers=False, prefetch_factor=None, **kw)
    batches = [b["key"] for b in dm.train_dataloader()]
    return batches, dm


def test_two_ranks_two_workers_each_sample_once_without_resampling(tmp_path):
    urls = _write_shards(tmp_path, [3] * 8)  # 24 samples
    seen, counts = [], []
    for rank in (0, 1):
        batches, dm = _rank_keys(urls, rank)
        assert dm.batches_per_epoch == 4  # 24 / (3 per batch x 2 ranks)
        counts.append(len(batches))
        seen += [k for b in batches for k in b]
    assert counts == [4, 4]
    assert len(seen) == 24 and len(set(seen)) == 24  # each sample exactly once across ranks x workers


def test_two_ranks_same_batch_count_on_uneven_shards_and_resampled_streams_differ(tmp_path):
    urls = _write_shards(tmp_path, [1, 7, 2, 5, 3])  # uneven: 18 samples
    counts = []
    for rank in (0, 1):  # not resampled: each rank cycles through its own shards, cut at the same length
        batches, _ = _rank_keys(urls, rank, batches_per_epoch=5, shuffle_buffer=4)
        counts.append(len(batches))
    assert counts == [5, 5]
    streams = []
    for rank in (0, 1):
        torch.manual_seed(0)  # same seed on both ranks (as Lightning's seed_everything): the rank must differ them
        batches, dm = _rank_keys(urls, rank, resampled=True, batches_per_epoch=5, shuffle_buffer=4)
        assert len(batches) == 5 and all(len(b) == 3 for b in batches)
        streams.append([k for b in batches for k in b])
    assert streams[0] != streams[1]


def test_validation_split_is_deterministic_and_held_out(tmp_path):
    urls = _write_shards(tmp_path, [4, 4])
    a = _dm(urls, val_samples=3, resampled=True, shuffle_buffer=4, batches_per_epoch=10)
    b = _dm(urls, val_samples=3, resampled=True, shuffle_buffer=4, batches_per_epoch=10, seed=5)
    val_a = [k for x in a.val_dataloader() for k in x["key"]]
    val_b = [k for x in b.val_dataloader() for k in x["key"]]
    assert val_a == val_b == ["shards-000000.tar/00000000", "shards-000000.tar/00000001", "shards-000000.tar/00000002"]
    assert not set(val_a) & set(_keys(a))


def test_cached_latents_equal_on_the_fly_encoding(tmp_path, tiny_teacher):
    src = _folder(tmp_path / "src")
    out = tmp_path / "lat"
    m = write_from_folder(src, out, resolution=16, image_format="png", min_size=8, teacher=tiny_teacher, progress=False)
    assert m["latents"] and m["resolution"] == 16 and m["count"] == 6
    cached = _dm(str(out), batch_size=6, batches_per_epoch=1)
    pix = _dm(str(out), batch_size=6, batches_per_epoch=1, use_latents=False)
    bl, bp = next(iter(cached.train_dataloader())), next(iter(pix.train_dataloader()))
    assert cached.use_latents and "latents" in bl and "pixels" not in bl
    assert bl["key"] == bp["key"]
    assert bl["latents"].dtype == torch.float32 and bl["latents"].shape == (6, 4, 8, 8)
    ref = tiny_teacher.encode_images(bp["pixels"])
    torch.testing.assert_close(bl["latents"], ref, atol=2e-3 * max(1.0, ref.abs().max().item()), rtol=1e-2)
    # a resolution that differs from the cached one falls back to pixels
    other = _dm(str(out), resolution=32, batch_size=2, batches_per_epoch=1)
    assert "pixels" in next(iter(other.train_dataloader())) and not other.use_latents


def test_under_a_trainer_workers_ship_uint8_and_the_step_sees_float(tmp_path):
    import lightning as L

    urls = _write_shards(tmp_path, [4, 4])
    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, _):
            seen.append((batch["pixels"].clone(), list(batch["key"])))
            return (self.w * batch["pixels"].mean()).sum()

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _dm(urls, batches_per_epoch=2, num_workers=1, persistent_workers=False, val_samples=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(), datamodule=dm)
    assert dm.train_stream.pixels_uint8 and len(seen) == 2
    ref = {k: p for b in _dm(urls, batch_size=1, batches_per_epoch=8).train_dataloader() for k, p in zip(b["key"], b["pixels"])}
    for pixels, keys in seen:
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        for k, p in zip(keys, pixels):
            assert torch.equal(p, ref[k])
