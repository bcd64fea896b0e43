"""``ddstrans make-shards``: from a folder (bad data counted, manifest) and from the teacher (resumable)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ddstrans.cli.main import main


def _read(out):
    samples = {}
    for tar in sorted(out.glob("shards-*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            samples[s["__key__"]] = s
    return samples


def _bad_folder(root):
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    (root / "rgb.txt").write_text("a cat on a sofa")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "a" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(root / "a" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(root / "a" / "b" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(root / "a" / "b" / "g16.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P").save(root / "pal.bmp")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "x.webp")
    Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(root / "tiny.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    data = (root / "x.webp").read_bytes()
    (root / "truncated.png").write_bytes((root / "a" / "gray.png").read_bytes()[:60])
    (root / "empty.png").write_bytes(b"")
    (root / "readme.md").write_text("not an image")
    return data


def test_from_folder_converts_skips_and_writes_manifest(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _bad_folder(src)
    rc = main(["make-shards", "from-folder", str(src), str(out), "--max-side", "32", "--maxcount", "3", "--no-progress"])
    assert rc == 1  # unreadable inputs make the exit status non-zero; the readable ones are still written
    printed = capsys.readouterr()
    assert "4 input file(s) could not be read" in printed.err
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 7 and m["num_shards"] == 3 and m["found_images"] == 11
    assert sum(m["skipped"].values()) == 5  # tiny, corrupt, truncated, empty, readme.md
    assert any("not an image file" in k for k in m["skipped"])
    assert any("too small" in k for k in m["skipped"])
    assert {"L->RGB", "RGBA->RGB", "CMYK->RGB", "I;16->RGB", "P->RGB"} <= set(m["converted"])
    assert m["commands"][0].startswith("ddstrans make-shards from-folder") and m["pixels"] and not m["latents"]
    assert m["max_side"] == 32 and m["missing_captions"] == 6
    samples = _read(out)
    assert len(samples) == 7
    for s in samples.values():
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.mode == "RGB" and max(im.size) <= 32
    caps = [s["txt"].decode() for s in samples.values() if "txt" in s]
    assert caps == ["a cat on a sofa"]
    assert "shards-{000000..000002}.tar" in printed.out
    # a second run does not silently mix into existing shards
    assert main(["make-shards", "from-folder", str(src), str(out), "--no-progress"]) == 1
    assert main(["make-shards", "from-folder", str(src), str(out), "--no-progress", "--overwrite", "--maxcount", "100"]) == 1
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 1
    for bad in ("corrupt.jpg", "truncated.png", "empty.png", "readme.md"):
        (src / bad).unlink()
    assert main(["make-shards", "from-folder", str(src), str(out), "--no-progress", "--overwrite"]) == 0  # only "too small" left


def _gen(out, teacher_dir, count, *extra):
    return main([
        "make-shards", "from-teacher", str(out), "--teacher", str(teacher_dir), "--prompt", "a photo of a cat",
        "--prompt", "a photo of a dog", "--count", str(count), "--steps", "2", "--batch-size", "2",
        "--maxcount", "2", "--device", "cpu", "--no-progress", *extra,
    ])


def test_from_teacher_writes_prompts_seeds_and_resumes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "gen"
    assert _gen(out, tiny_teacher_dir, 3, "--seed", "10") == 0
    first = _read(out)
    assert sorted(first) == ["00000000", "00000001", "00000002"]
    for k, s in first.items():
        meta = json.loads(s["json"])
        assert meta["seed"] == 10 + int(k) and meta["index"] == int(k)
        assert s["txt"].decode() == meta["prompt"] == ("a photo of a cat", "a photo of a dog")[int(k) % 2]
        assert Image.open(io.BytesIO(s["png"])).size == (16, 16)
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 3 and m["teacher"].endswith("teacher") and m["generation"]["seed"] == 10
    old_shards = {p.name: p.read_bytes() for p in out.glob("shards-*.tar")}

    # an interrupted run leaves a shard the manifest does not list: it is removed on resume
    (out / "shards-000042.tar").write_bytes(b"partial")
    assert _gen(out, tiny_teacher_dir, 5, "--seed", "10") == 0
    after = _read(out)
    assert sorted(after) == [f"{i:08d}" for i in range(5)]
    assert not (out / "shards-000042.tar").exists()
    for name, data in old_shards.items():  # existing shards untouched, new ones numbered after them
        assert (out / name).read_bytes() == data
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 5 and len(m["commands"]) == 2
    assert sorted(m["shards"]) == ["shards-000000.tar", "shards-000001.tar", "shards-000002.tar"]
    assert json.loads(after["00000004"]["json"])["seed"] == 14
    # same seed -> same image, whatever the batching: regenerate sample 2 alone
    solo = tmp_path / "solo"
    assert main(["make-shards", "from-teacher", str(solo), "--teacher", str(tiny_teacher_dir), "--prompt", "a photo of a cat",
                 "--prompt", "a photo of a dog", "--count", "3", "--steps", "2", "--batch-size", "3", "--seed", "10",
                 "--device", "cpu", "--no-progress"]) == 0
    a = np.asarray(Image.open(io.BytesIO(_read(solo)["00000002"]["png"])), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(after["00000002"]["png"])), dtype=int)
    assert np.abs(a - b).max() <= 1

    # re-running with the same count adds nothing; other settings are refused
    assert _gen(out, tiny_teacher_dir, 5, "--seed", "10") == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == 5
    assert _gen(out, tiny_teacher_dir, 6, "--seed", "11") == 1


@pytest.mark.parametrize("fmt", ["png"])
def test_from_teacher_latents_train_through_datamodule(tmp_path, tiny_teacher_dir, tiny_teacher, fmt):
    from ddstrans.data.shards import ShardDataModule

    out = tmp_path / "gen"
    assert _gen(out, tiny_teacher_dir, 4, "--latents", "--format", fmt) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["latents"] and m["latent_dtype"] == "float16" and m["latent_channels"] == 4
    samples = _read(out)
    z = np.load(io.BytesIO(samples["00000000"]["latents.npy"]))
    assert z.dtype == np.float16 and z.shape == (4, 8, 8)
    dm = ShardDataModule(urls=str(out / "shards-{000000..000001}.tar"), batch_size=2, num_workers=0, resolution=16,
                         downsample_factor=2, val_samples=0, pin_memory=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (2, 4, 8, 8) and batch["caption"][0].startswith("a photo of a")
    assert dm.batches_per_epoch == 2  # 4 samples / batch 2, counted from the manifest
