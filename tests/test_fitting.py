"""Aspect ratio at translation (``fit``: pad, crop, resize, native) and ``ddstrans translate``'s inputs
(folders, globs, ``-`` on stdin) and size flags."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.cli.main import main as cli
from ddstrans.fitting import fit_image, restore_image, round_to_multiple
from ddstrans.inputs import expand_inputs
from ddstrans.translator import Translator


def _ramp(w, h):
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(x.astype(np.uint8))


def test_pad_keeps_every_pixel_and_the_aspect_ratio():
    im = _ramp(64, 32)
    net, place = fit_image(im, "pad", 32)
    assert net.size == (32, 32) and place.box == (0, 8, 32, 24) and place.size == (64, 32)
    arr = np.asarray(net)
    assert (arr[:8] == arr[8]).all() and (arr[24:] == arr[23]).all()  # edge rows repeated, not black
    back = restore_image(net, place)
    assert back.size == (64, 32)
    assert np.abs(np.asarray(back, dtype=int) - np.asarray(im, dtype=int)).mean() < 4  # the identity round-trips


def test_crop_resize_native_geometry():
    im = _ramp(60, 30)
    net, place = fit_image(im, "crop", 32)
    assert net.size == (32, 32) and restore_image(net, place).size == (30, 30)
    net, place = fit_image(im, "resize", 32)
    assert net.size == (32, 32) and restore_image(net, place).size == (60, 30)
    net, place = fit_image(im, "native", 32, multiple=8)
    assert net.size == (64, 32) and restore_image(net, place).size == (60, 30)
    assert round_to_multiple(3, 8) == 8 and round_to_multiple(13, 8) == 16 and round_to_multiple(11, 8) == 8
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_image(im, "stretch", 32)


def test_translator_fit_modes(shapes_translator_dir):
    tr = Translator.from_pretrained(shapes_translator_dir)
    assert tr.size_multiple == 4  # pixel space, three UNet levels
    wide = Image.open(shapes_translator_dir / "examples" / "example_0.png").resize((64, 32), Image.NEAREST)
    calls = []
    tr.generator.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    for fit, size in (("pad", (64, 32)), ("resize", (64, 32)), ("crop", (32, 32)), ("native", (64, 32))):
        assert tr(wide, task="to_blue", fit=fit).size == size
    assert calls == [(1, 3, 32, 32)] * 3 + [(1, 3, 32, 64)]  # native: the input's own size
    # pad differs from the old stretch; the padded view is what the network saw
    pad, stretch = tr(wide, task="to_blue"), tr(wide, task="to_blue", fit="resize")
    assert not np.array_equal(np.asarray(pad), np.asarray(stretch))
    # native: a batch of two sizes is one forward pass per size, outputs in input order
    calls.clear()
    small = wide.resize((30, 30))
    outs = tr([wide, small, wide], task="to_red", fit="native")
    assert [o.size for o in outs] == [(64, 32), (30, 30), (64, 32)] and sorted(calls) == [(1, 3, 32, 32), (2, 3, 32, 64)]
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(wide, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        direct = tr.translate_tensor(x, "to_red")
    from ddstrans.images import tensor_to_pil

    # (batched with another image: float rounding may move a value by one level)
    assert np.abs(np.asarray(outs[0], dtype=int) - np.asarray(tensor_to_pil(direct)[0], dtype=int)).max() <= 1


def test_expand_inputs_folders_globs_stdin(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for rel in ("b.png", "a.jpg", "notes.txt", "sub/c.png"):
        (d / rel).write_bytes(b"x")
    assert expand_inputs([d]) == [d / "a.jpg", d / "b.png"]
    assert expand_inputs([str(d / "*.png")]) == [d / "b.png"]
    assert expand_inputs([str(d / "**" / "*.png")]) == [d / "b.png", d / "sub" / "c.png"]
    assert expand_inputs([str(d / "*.gif")]) == []
    stdin = io.StringIO(f"{d / 'sub' / 'c.png'}\n\n# a comment\n{d / 'a.jpg'}\n")
    assert expand_inputs(["-", d / "b.png"], stdin=stdin) == [d / "sub" / "c.png", d / "a.jpg", d / "b.png"]


def test_translate_cli_stdin_glob_and_sizes(shapes_translator_dir, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    ex = Image.open(shapes_translator_dir / "examples" / "example_2.png")
    ex.resize((48, 32), Image.NEAREST).save(src / "wide.png")
    ex.save(src / "square.png")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{src / 'wide.png'}\n{src / 'square.png'}\n"))
    assert cli(["translate", str(shapes_translator_dir), "-", "--task", "to_blue", "-o", str(tmp_path / "o1"),
                "--no-progress"]) == 0
    tr = Translator.from_pretrained(shapes_translator_dir)
    wide = Image.open(src / "wide.png").convert("RGB")
    got = Image.open(tmp_path / "o1" / "wide.png")
    assert got.size == (48, 32) and np.array_equal(np.asarray(got), np.asarray(tr(wide, task="to_blue")))
    assert cli(["translate", str(shapes_translator_dir), str(src / "w*.png"), "--task", "to_blue", "--resize",
                "-o", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["wide.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o2" / "wide.png")),
                          np.asarray(tr(wide, task="to_blue", fit="resize")))
    assert cli(["translate", str(shapes_translator_dir), str(src), "--task", "to_blue", "--native-size",
                "-o", str(tmp_path / "o3"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o3" / "wide.png")),
                          np.asarray(tr(wide, task="to_blue", fit="native")))
    with pytest.raises(SystemExit):
        cli(["translate", str(shapes_translator_dir), str(src), "--task", "to_blue", "--resize", "--native-size",
             "-o", str(tmp_path / "o4")])
