"""The benchmark scripts run end to end with tiny settings and keep their machine-readable last lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script: str, *args: str, tmp_path: Path) -> list[str]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_train_step_last_line(tmp_path):
    out = tmp_path / "res.json"
    lines = _run("bench_train_step.py", "--arch", "tiny", "--batch", "2", "--steps", "3", "--warmup", "1",
                 "--json", str(out), tmp_path=tmp_path)
    assert re.fullmatch(r"overhead=\d+\.\d\d vs_plain=\d+\.\d\d", lines[-1]), lines[-1]
    assert any(line.startswith("| (a) Lightning step") for line in lines)
    import json

    res = json.loads(out.read_text())
    assert res["steps"] == 3 and not res["teacher_call"]["has_graph"]  # the teacher keeps no autograd graph


@pytest.mark.slow
def test_bench_translate_last_line(tmp_path):
    lines = _run("bench_translate.py", "--arch", "tiny", "--quick", "--batch", "2", "--measure-steps", "2",
                 "--rounds", "1", tmp_path=tmp_path)
    assert re.fullmatch(r"edit_over_single_pass=\d+\.\d", lines[-1]), lines[-1]
    assert any("EXTRAPOLATED from 2 measured steps to 200" in line for line in lines)


def test_bench_keep_adapters_table(tmp_path):
    lines = _run("bench_keep_adapters.py", "--width-divisor", "10", tmp_path=tmp_path)
    assert re.fullmatch(r"unet_sha256=[0-9a-f]{16}", lines[-1]), lines[-1]
    row = lines[-2].split("|")
    base, trained, adapters_mib = (int(row[3].replace(",", "")), int(row[5].replace(",", "")), float(row[6]))
    assert 0 < trained < 0.2 * base and 0 < adapters_mib < 0.2 * base * 4 / 2**20


def test_gpu_check_script_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_teacher_channels_last_gives_the_same_scores(tiny_teacher):
    """The opt-in ``Teacher.set_channels_last()`` (a performance option) changes no result."""
    import torch

    from ddstrans.scores import dds_grad

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    zt = z + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    src, tgt = tiny_teacher.encode_prompts(["a cat"] * 2), tiny_teacher.encode_prompts(["a lion"] * 2)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8, generator=g)
    ref = dds_grad(tiny_teacher, z, zt, src, tgt, t=t, noise=noise, guidance_scale=7.5)
    tiny_teacher.set_channels_last()
    assert tiny_teacher.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    tiny_teacher.to("cpu", torch.float32)  # to() keeps the format
    assert tiny_teacher.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dds_grad(tiny_teacher, z, zt, src, tgt, t=t, noise=noise, guidance_scale=7.5), ref, rtol=1e-3, atol=1e-4)


def test_bench_quality_targets_table_says_which_target_holds():
    """Each family's cell compares the network with per-image DDS of the same run and says whether the target holds:
    accuracy within 5 points, kept PSNR within 1 dB, shape IoU at least DDS's."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_quality import targets_table
    finally:
        sys.path.remove(str(SCRIPTS))

    def row(variant, family, acc, iou, psnr):
        return {"variant": variant, "family": family, "target_acc": acc, "mask_iou": iou, "keep_psnr": psnr}

    rows = [row("network: main", "color", 0.96, 0.97, 36.5), row("network: main", "shape", 0.94, 0.70, 41.0),
            row("per-image DDS (100 steps)", "color", 1.0, 0.95, 37.3),
            row("per-image DDS (100 steps)", "shape", 1.0, 0.85, 38.2)]
    lines = targets_table(rows).splitlines()
    color = next(line for line in lines if line.startswith("| color"))
    shape = next(line for line in lines if line.startswith("| shape"))
    assert "0.960 / 1.000 yes" in color and "36.50 / 37.30 yes" in color  # 4 points, 0.8 dB: both hold
    assert "0.940 / 1.000 NO" in shape and "41.00 / 38.20 yes" in shape and "0.700 / 0.850 NO" in shape
    assert not any(line.startswith("| background") for line in lines)  # no DDS row, no verdict


@pytest.mark.slow
def test_bench_zero_shot_scores_each_kept_checkpoint(tmp_path):
    """With --every, each checkpoint kept along the way is exported and scored beside the last one (whose row is the
    design's own, not repeated as a step)."""
    out = tmp_path / "out"
    _run("bench_zero_shot.py", "--designs", "target", "--steps", "4", "--every", "2", "--n", "2", "--jobs", "1",
         "--out", str(out), tmp_path=tmp_path)
    labels = [line.split("|")[1].strip() for line in (out / "zero_shot.md").read_text().splitlines()[2:]]
    # three groups each, then the routed new pairs and compositions
    assert labels == ["target, step 2"] * 3 + ["target, step 2, routed"] * 2 + ["target"] * 3 + ["target, routed"] * 2
    assert (out / "target" / "step_2" / "translator.json").is_file()
