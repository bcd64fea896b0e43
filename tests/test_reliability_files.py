"""Reliability of the file-writing and file-reading commands (docs/reliability.md): export builds next to its
target and swaps in whole, under a lock; translate writes unique names through temp files; translators load only
listed, verified files from inside their directory; one image policy refuses declared-huge images per file."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.cli.main import main as cli
from ddstrans.data.procedural import ProceduralDataModule
from ddstrans.export import ExportError, export_checkpoint
from ddstrans.generator import build_generator
from ddstrans.module import DDSTranslationModule
from ddstrans.teacher import Teacher
from ddstrans.translator import Translator, TranslatorLoadError

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
TASKS = [{"name": "cat2lion", "source": "a photo of a cat", "target": "a photo of a lion"},
         {"name": "cat2dog", "source": "a photo of a cat", "target": "a photo of a dog"}]
WEIGHTS = "generator/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ckpts(tiny_teacher_dir, tmp_path_factory):
    """Two checkpoints with different generator weights (2 and 4 steps), and a translator of the first."""
    tmp = tmp_path_factory.mktemp("rel_files")
    teacher = Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp / "cache")
    torch.manual_seed(0)
    m = DDSTranslationModule(teacher, TASKS, functools.partial(build_generator, **TINY),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5},
                             validation={"num_images": 0})
    out = []
    for steps in (2, 4):
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp))
        trainer.fit(m, datamodule=ProceduralDataModule(image_size=16, batch_size=2, num_train=8))
        trainer.save_checkpoint(tmp / f"s{steps}.ckpt")
        out.append(tmp / f"s{steps}.ckpt")
    return out[0], out[1], export_checkpoint(out[0], tmp / "translator")


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".lock" in p.name or ".old-" in p.name]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- 1. export never deletes before it has built
def test_export_overwrite_with_a_bad_checkpoint_keeps_the_existing_translator(ckpts, tmp_path):
    a, _, good = ckpts
    target = tmp_path / "tr"
    shutil.copytree(good, target)
    before = _tree(target)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(a.read_bytes()[:1000])
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        export_checkpoint(bad, target, overwrite=True)
    assert _tree(target) == before and not _leftovers(tmp_path)
    Translator.from_pretrained(target)


def test_export_overwrite_refuses_a_directory_that_is_not_a_translator(ckpts, tmp_path):
    a, _, _ = ckpts
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not a translator directory"):
            export_checkpoint(a, mine, overwrite=overwrite)
    assert (mine / "holiday.jpg").read_bytes() == b"precious" and not _leftovers(tmp_path)
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_checkpoint(a, f, overwrite=True)


def test_export_overwrite_swaps_in_a_whole_new_translator(ckpts, tmp_path):
    a, b, good = ckpts
    target = tmp_path / "tr"
    shutil.copytree(good, target)
    export_checkpoint(b, target, overwrite=True)
    info = json.loads((target / "translator.json").read_text())
    assert info["training"]["checkpoint"] == str(b.resolve())
    assert _sha(target / WEIGHTS) != _sha(good / WEIGHTS)
    Translator.from_pretrained(target)
    assert not _leftovers(tmp_path)


# ---------------------------------------------------------------------- 2. one export at a time; nothing partial
def test_export_refuses_while_another_export_holds_the_target(ckpts, tmp_path, capsys):
    a, _, _ = ckpts
    target = tmp_path / "tr"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".tr.lock"
        import socket

        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        rc = cli(["export", str(a), str(target)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and f"in use by pid {holder.pid}" in err
        assert not target.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    assert cli(["export", str(a), str(target)]) == 0
    assert "stale lock" in capsys.readouterr().err and not _leftovers(tmp_path)


def test_two_concurrent_exports_leave_one_whole_translator(ckpts, tmp_path):
    a, b, _ = ckpts
    refs = {}
    for c in (a, b):
        refs[str(c.resolve())] = _sha(export_checkpoint(c, tmp_path / f"ref_{c.stem}") / WEIGHTS)
    target = tmp_path / "race" / "tr"
    target.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code = "import sys; from ddstrans.cli.main import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, "export", str(c), str(target), "--overwrite"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in (a, b)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (rc == 1 and "in use by pid" in err and "Traceback" not in err), err
    info = json.loads((target / "translator.json").read_text())
    assert _sha(target / WEIGHTS) == refs[info["training"]["checkpoint"]]  # metadata and weights of one checkpoint
    Translator.from_pretrained(target)
    assert not _leftovers(target.parent)


def test_export_on_a_full_disk_leaves_nothing_and_keeps_the_old_translator(ckpts, tmp_path, monkeypatch):
    a, b, good = ckpts
    target = tmp_path / "tr"
    shutil.copytree(good, target)
    before = _tree(target)
    import ddstrans.tasks

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ddstrans.tasks.TaskTable, "save", full)
    with pytest.raises(ExportError, match="no space left on"):
        export_checkpoint(b, target, overwrite=True)
    with pytest.raises(ExportError, match="no space left on"):
        export_checkpoint(b, tmp_path / "new")
    assert _tree(target) == before and not (tmp_path / "new").exists() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------- 5/10. translate: unique names, whole files
def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(path)
    return path


def test_translate_output_names_never_collide(ckpts, tmp_path, capsys):
    _, _, tr = ckpts
    ins = [_png(tmp_path / "d1" / "a.png", 0), _png(tmp_path / "d2" / "a.png", 1), _png(tmp_path / "d1" / "a_1.png", 2)]
    out = tmp_path / "out"
    args = [*map(str, ins), str(ins[0])]  # a file given twice is translated once
    assert cli(["translate", str(tr), "--task", "cat2dog", *args, "-o", str(out), "--no-progress"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["d1/a.png", "d1/a_1.png", "d2/a.png"] and "wrote 3 image(s)" in capsys.readouterr().out
    # same stem, different suffix in one folder: the suffix is kept
    _png(tmp_path / "e" / "x.png", 3).with_suffix(".jpg").write_bytes((tmp_path / "e" / "x.png").read_bytes())
    out2 = tmp_path / "out2"
    assert cli(["translate", str(tr), "--task", "cat2dog", str(tmp_path / "e"), "-o", str(out2), "--no-progress"]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["x.jpg.png", "x.png.png"]


def test_translate_on_a_full_disk_leaves_no_partial_output(ckpts, tmp_path, monkeypatch, capsys):
    _, _, tr = ckpts
    ins = [_png(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("ab")]
    out = tmp_path / "out"
    real_save = Image.Image.save

    def full(self, fp, *a, **kw):
        Path(fp).write_bytes(b"")  # what a full disk leaves: an empty or short file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    rc = cli(["translate", str(tr), "--task", "cat2dog", *map(str, ins), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: no space left on {out}" in err
    assert list(out.iterdir()) == []  # no 0-byte PNG under a final name, no temp file
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert cli(["translate", str(tr), "--task", "cat2dog", *map(str, ins), "-o", str(out), "--no-progress"]) == 0


# ---------------------------------------------------------------------- 6/7. only listed files, only inside
def test_translator_refuses_an_unlisted_index_that_redirects_the_weights(ckpts, tmp_path):
    _, b, good = ckpts
    d = tmp_path / "t"
    shutil.copytree(good, d)
    other = export_checkpoint(b, tmp_path / "other")
    shutil.copy(other / WEIGHTS, d / "generator" / "shard-00001.safetensors")
    from safetensors.torch import load_file

    keys = load_file(str(other / WEIGHTS)).keys()
    (d / "generator" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(keys, "shard-00001.safetensors")}))
    with pytest.raises(TranslatorLoadError, match="unexpected file generator/"):
        Translator.from_pretrained(d)
    # unverified loading reads only the listed weights file by path, not the index
    (d / "generator" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    tr = Translator.from_pretrained(d, verify=False)
    ref = Translator.from_pretrained(good)
    for (k, v), (_, w) in zip(tr.generator.state_dict().items(), ref.generator.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside.bin", "generator/../../outside.bin"])
def test_translator_refuses_paths_outside_before_reading_them(ckpts, tmp_path, monkeypatch, entry):
    _, _, good = ckpts
    d = tmp_path / "t"
    shutil.copytree(good, d)
    (tmp_path / "outside.bin").write_bytes(b"x" * 1000)
    info = json.loads((d / "translator.json").read_text())
    info["files"][entry] = "0" * 64
    (d / "translator.json").write_text(json.dumps(info))
    import ddstrans.translator as T

    read = []
    monkeypatch.setattr(T, "sha256_file", lambda p: read.append(p) or "")
    with pytest.raises(TranslatorLoadError, match="not a plain relative path"):
        Translator.from_pretrained(d)
    assert read == []


def test_translator_refuses_symlinks_leaving_the_directory(ckpts, tmp_path):
    _, _, good = ckpts
    d = tmp_path / "t"
    shutil.copytree(good, d)
    outside = tmp_path / "tasks_copy.safetensors"
    shutil.move(d / "tasks.safetensors", outside)
    (d / "tasks.safetensors").symlink_to(outside)
    with pytest.raises(TranslatorLoadError, match="symbolic link"):
        Translator.from_pretrained(d)


# ---------------------------------------------------------------------- 8. one image policy
def _bomb(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A valid PNG header declaring w x h pixels (a few hundred bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_declared_huge_image_is_a_per_file_error_in_translate_edit_and_make_shards(ckpts, tiny_teacher_dir, tmp_path,
                                                                                   capsys):
    _, _, tr = ckpts
    d = tmp_path / "in"
    ins = [_png(d / "a.png", 0), _bomb(d / "bomb.png"), _png(d / "c.png", 1)]
    out = tmp_path / "out"
    rc = cli(["translate", str(tr), "--task", "cat2dog", *map(str, ins), "-o", str(out), "--no-progress",
              "--batch-size", "3"])
    cap = capsys.readouterr()
    assert rc == 1 and sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert "skipped" in cap.err and "bomb.png: declared size" in cap.err and "Traceback" not in cap.err
    rc = cli(["edit", str(ins[1]), "--teacher", str(tiny_teacher_dir), "--source", "a cat", "--target", "a dog",
              "-o", str(tmp_path / "o.png"), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "declared size" in err
    rc = cli(["make-shards", "from-folder", str(d), str(tmp_path / "shards"), "--min-size", "8", "--no-progress"])
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["count"] == 2 and m["skipped"] == {"image too large": 1} and rc == 1


def test_lock_file_is_exclusive_and_released(tmp_path):
    from ddstrans.locks import LockFile

    p = tmp_path / ".x.lock"
    with LockFile(p, "x") as lock:
        assert lock.held and json.loads(p.read_text())["pid"] == os.getpid()
        with pytest.raises(Exception, match=f"in use by pid {os.getpid()}"):
            LockFile(p, "x").acquire()
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_checkpoint_save_streams_to_disk_instead_of_memory(tmp_path):
    # a checkpoint serialised into a memory buffer first doubles a large run's peak memory while it saves
    import tracemalloc

    from ddstrans.callbacks import atomic_torch_save

    state = {"w": torch.zeros(16 * 2**20 // 4)}  # 16 MiB of tensor data (allocated before tracing starts)
    tracemalloc.start()
    try:
        atomic_torch_save(state, tmp_path / "last.ckpt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"saving allocated {peak / 2**20:.1f} MiB of Python memory"
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
