"""The memory model: exact parameter counts, and activation/state terms that move the way the savers say."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ddstrans.memory import Setting, activation_profile, parameter_counts, predict

pytestmark = pytest.mark.slow  # meta-device SD-1.5 models: ~1-2 min on 2 shared cores


def test_parameter_counts_are_sd15s():
    c = parameter_counts("sd15")
    assert c["unet"] == 859_520_964 and c["vae"] == 83_653_863 and c["text"] == 123_060_480
    assert 7_000_000 < c["lora_trainable"] < 9_000_000  # rank 8 on the default targets + conv_out


def test_savers_lower_the_prediction():
    counts = parameter_counts("sd15")
    base = Setting(resolution=256, batch=2, generator="lora")
    p = {k: predict(s, counts)["peak_gib"] for k, s in {
        "lora": base, "full": replace(base, generator="full"),
        "nockpt": replace(base, gradient_checkpointing=False),
        "eager": replace(base, gradient_checkpointing=False, attention="eager"),
        "fp32": replace(base, teacher_dtype="fp32")}.items()}
    assert p["lora"] < p["nockpt"] < p["eager"]
    assert p["full"] - p["lora"] > 15  # 22 bytes per trained parameter of a 0.86 B UNet
    assert p["fp32"] - p["lora"] > 1.9  # the teacher's 1.07 B parameters at 4 instead of 2 bytes
    prof = activation_profile("sd15", 256, 1, "lora")
    assert 0 < prof["saved_checkpointed"] < prof["saved"]
    # saved activations scale with the pixel count
    big = activation_profile("sd15", 512, 1, "lora")
    assert 3.5 < big["saved"] / prof["saved"] < 4.5
