"""Zero-shot editing: the Python function and the ``ddstrans edit`` CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddstrans.cli.main import main
from ddstrans.editing import EditConfig, edit_latents
from ddstrans.scores import shared_noise


def test_edit_keeps_latent_when_prompts_match(tiny_teacher):
    z = torch.randn(1, 4, 8, 8)
    emb = tiny_teacher.encode_prompts(["a photo of a cat"])
    out = edit_latents(tiny_teacher, z, emb, emb, EditConfig(steps=3))
    assert torch.equal(out, z)  # DDS is exactly zero: nothing moves


def test_edit_moves_latent_towards_target(tiny_teacher):
    z = torch.randn(1, 4, 8, 8)
    src, tgt = tiny_teacher.encode_prompts(["a photo of a cat"]), tiny_teacher.encode_prompts(["a photo of a lion"])
    out = edit_latents(tiny_teacher, z, src, tgt, EditConfig(steps=3))
    assert not torch.equal(out, z) and torch.isfinite(out).all()
    sds = edit_latents(tiny_teacher, z, src, tgt, EditConfig(steps=3, method="sds"))
    assert not torch.equal(sds, out)


def test_edit_with_adam_takes_normalised_steps(tiny_teacher):
    """Adam's first step moves every pixel with a non-zero gradient by lr (sign of the gradient), SGD by lr x grad."""
    z = torch.randn(1, 4, 8, 8)
    src, tgt = tiny_teacher.encode_prompts(["a photo of a cat"]), tiny_teacher.encode_prompts(["a photo of a lion"])
    sgd = edit_latents(tiny_teacher, z, src, tgt, EditConfig(steps=1, lr=1e-3))
    adam = edit_latents(tiny_teacher, z, src, tgt, EditConfig(steps=1, lr=1e-3, optimizer="adam"))
    step = (adam - z).abs()
    torch.testing.assert_close(step[step > 0], torch.full_like(step[step > 0], 1e-3), rtol=1e-3, atol=1e-7)
    assert (step > 0).float().mean() > 0.9 and not torch.allclose((sgd - z).abs(), step)


def test_invalid_edit_config():
    with pytest.raises(ValueError, match="steps"):
        EditConfig(steps=0).validate()
    with pytest.raises(ValueError, match="method"):
        EditConfig(method="ddim").validate()
    with pytest.raises(ValueError, match="optimizer"):
        EditConfig(optimizer="lbfgs").validate()
    with pytest.raises(ValueError, match="t_range_end"):
        EditConfig(t_range_end=(300, 20)).validate()
    with pytest.raises(ValueError, match="t_range"):
        EditConfig(t_range=(50, 1200)).validate()


def _record_dds_calls(monkeypatch) -> list[dict]:
    """Replace the DDS gradient by zeros and record the keyword arguments of every call."""
    import ddstrans.guidance as guidance

    calls = []

    def fake_grad(teacher, z_src, z, emb_src, emb_tgt, **kw):
        calls.append(kw)
        return torch.zeros_like(z)

    monkeypatch.setattr(guidance, "dds_grad", fake_grad)
    return calls


def test_edit_anneals_the_timestep_range_from_start_to_end(tiny_teacher, monkeypatch):
    """Each step draws t from the interpolated range: the first from ``t_range``, the last from ``t_range_end``."""
    calls = _record_dds_calls(monkeypatch)
    z, emb = torch.randn(1, 4, 8, 8), tiny_teacher.encode_prompts(["a cat"])
    edit_latents(tiny_teacher, z, emb, emb, EditConfig(steps=5, t_range=(50, 650), t_range_end=(10, 250)))
    assert [c["t_range"] for c in calls] == [(50, 650), (40, 550), (30, 450), (20, 350), (10, 250)]
    calls.clear()
    edit_latents(tiny_teacher, z, emb, emb, EditConfig(steps=3, t_range=(50, 650)))
    assert [c["t_range"] for c in calls] == [(50, 650)] * 3


def test_edit_with_shared_noise_uses_one_noise_for_every_image_and_step(tiny_teacher, monkeypatch):
    calls = _record_dds_calls(monkeypatch)
    z, emb = torch.randn(3, 4, 8, 8), tiny_teacher.encode_prompts(["a cat"])
    edit_latents(tiny_teacher, z, emb, emb, EditConfig(steps=2, shared_noise_prob=1.0, shared_noise_seed=5))
    want = shared_noise((4, 8, 8), 5)
    assert len(calls) == 2 and all(torch.equal(x, want) for c in calls for x in c["noise"])
    calls.clear()
    edit_latents(tiny_teacher, z, emb, emb, EditConfig(steps=2))
    assert [c["noise"] for c in calls] == [None, None]  # fresh noise, drawn inside the score


def test_edit_from_an_initial_latent_scores_against_the_source(tiny_teacher, monkeypatch):
    """``z_init`` is where the optimisation starts; the score still compares with the source."""
    import ddstrans.guidance as guidance

    seen = []

    def fake_grad(teacher, z_src, z, emb_src, emb_tgt, **kw):
        seen.append((z_src.clone(), z.clone()))
        return torch.ones_like(z)

    monkeypatch.setattr(guidance, "dds_grad", fake_grad)
    z_src, z_init, emb = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 3.0), tiny_teacher.encode_prompts(["a cat"])
    out = edit_latents(tiny_teacher, z_src, emb, emb, EditConfig(steps=2, lr=0.1, loss_scale=1.0), z_init=z_init)
    assert torch.equal(seen[0][0], z_src) and torch.equal(seen[0][1], z_init)
    # surrogate 'hw': d/dz (z * 1).sum() / (H * W) = 1/64 per step
    assert torch.allclose(out, z_init - 2 * 0.1 / 64)
    assert torch.equal(z_init, torch.full((2, 4, 8, 8), 3.0))  # the caller's tensor is not modified
    with pytest.raises(ValueError, match="z_init"):
        edit_latents(tiny_teacher, z_src, emb, emb, EditConfig(steps=1), z_init=torch.zeros(1, 4, 8, 8))


def _image(path, size=(20, 14)):
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def test_edit_cli_writes_png_of_input_size(tiny_teacher_dir, tmp_path, capsys):
    src = _image(tmp_path / "in.jpg")
    out = tmp_path / "out" / "edited.png"
    argv = [
        "edit", str(src), "--teacher", str(tiny_teacher_dir), "--source", "a photo of a cat",
        "--target", "a photo of a lion", "-o", str(out), "--steps", "2",
    ]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (20, 14) and im.mode == "RGB"
    assert main(argv) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--sds"]) == 0


def test_edit_cli_reports_bad_input(tiny_teacher_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rc = main(["edit", str(bad), "--teacher", str(tiny_teacher_dir), "--source", "a", "--target", "b", "-o", str(tmp_path / "o.png")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err
    rc = main(["edit", str(bad), "--teacher", str(tmp_path / "missing"), "--source", "a", "--target", "b", "-o", str(tmp_path / "o.png")])
    assert rc == 1


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "edit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--steps", "--lr", "--guidance", "--seed", "--size", "--sds"):
        assert flag in out
