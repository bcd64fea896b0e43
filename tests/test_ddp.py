"""Two-process CPU DDP (gloo) through the Hydra app: identical generator weights on both ranks (also when gradient
accumulation changes at a step), one teacher replica per process outside DDP, and only rank 0 writes run files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = '''
import os, torch
from lightning.pytorch.callbacks import Callback

class Probe(Callback):
    """Test instrumentation: each rank dumps its generator weights and what DDP wraps."""
    def __init__(self, out):
        self.out, self.batches = out, 0
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out, exist_ok=True)
        ddp_params = sum(p.numel() for p in trainer.strategy.model.parameters())
        torch.save({"state": {k: v.detach().cpu() for k, v in pl_module.generator.state_dict().items()},
                    "ema": [t.detach().cpu() for t in pl_module.ema.shadow_params],
                    "ddp_params": ddp_params,
                    "generator_params": sum(p.numel() for p in pl_module.generator.parameters()),
                    "teacher_device": str(pl_module.teacher.device),
                    "world_size": trainer.world_size, "rank": trainer.global_rank, "batches": self.batches},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))
'''


ACCUMULATE_FROM_STEP_3 = ["+callbacks.accumulate._target_=ddstrans.accumulation.StepGradAccumulation",
                          "+callbacks.accumulate.scheduling={3: 2}"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("extra", [[], ACCUMULATE_FROM_STEP_3], ids=["plain", "accumulation_from_step_3"])
def test_two_process_cpu_ddp(tmp_path, extra):
    (tmp_path / "probe_pkg").mkdir()
    (tmp_path / "probe_pkg" / "ddp_probe.py").write_text(PROBE)
    run, probe = tmp_path / "run", tmp_path / "probe"
    exe = Path(sys.executable).with_name("ddstrans-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ddstrans.cli.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "probe_pkg")}
    args = ["experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run}",
            "+callbacks.probe._target_=ddp_probe.Probe", f"+callbacks.probe.out={probe}", *extra]
    out = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-5000:]

    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # 6 optimizer steps; with accumulation from step 3: steps 0-3 one batch each (step 3 is batch 3, not a multiple
    # of 2), steps 4 and 5 two each
    assert r0["batches"] == r1["batches"] == (8 if extra else 6)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    for a, b in zip(r0["ema"], r1["ema"]):
        assert torch.equal(a, b)
    assert r0["ddp_params"] == r0["generator_params"]  # DDP wraps the generator only, never the teacher
    assert r0["teacher_device"] == "cpu"
    # training moved the weights away from the identity init
    assert r0["state"]["unet.conv_out.weight"].abs().sum() > 0

    # only rank 0 writes run files (rank 1 writes just Hydra's own job log)
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    ckpts = [f for f in files if f.startswith("checkpoints/")]
    assert sorted(ckpts) == ["checkpoints/last.ckpt", "checkpoints/step_0000006.ckpt"]
    assert len([f for f in files if f.startswith("val/")]) == 2
    assert len([f for f in files if f.endswith("metrics.csv")]) == 1
    assert "train_ddp_process_1.log" in files
    assert not (run / ".hydra" / "config.yaml").read_text().count("train_ddp_process")  # rank 0's config
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 6
    for k, v in r0["state"].items():
        assert torch.equal(ck["state_dict"][f"generator.{k}"], v)
