"""Scale settings: one clear line before heavy work for each bad combination; memory switches applied."""

from __future__ import annotations

import pytest

from ddstrans.cli.train import compose
from ddstrans.validation import ConfigError, validate_config, validate_with_teacher


@pytest.mark.parametrize("overrides, message", [
    (["generator=lora_from_teacher", "generator.rank=0"], r"generator.rank=0: the LoRA rank must be >= 1"),
    (["generator=lora_from_teacher", "generator.target_modules=[to_q,conv_out]"], "must not contain conv_out"),
    (["optim=adamw8bit"], "needs the bitsandbytes package"),
    (["trainer=fsdp", "trainer.accelerator=cpu", "optim.ema.enabled=false"], "runs on GPUs only"),
    (["trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=1", "optim.ema.enabled=false"], "starts one"),
    (["trainer=fsdp", "trainer.accelerator=gpu", "generator=lora_from_teacher"], "LoRA generator shares"),
    (["trainer=fsdp", "trainer.accelerator=gpu"], "pass optim.ema.enabled=false"),
    (["model.memory.attention=flash"], "must be one of sdpa, eager"),
])
def test_bad_scale_settings_fail_before_the_teacher_loads(overrides, message):
    pytest.importorskip("omegaconf")
    if overrides == ["optim=adamw8bit"]:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            pytest.skip("bitsandbytes is installed here")
    cfg = compose(["experiment=smoke", *overrides])
    with pytest.raises(ConfigError, match=message) as e:
        validate_config(cfg)
    assert "\n" not in str(e.value)


def test_unknown_lora_target_named_with_the_teacher(tiny_teacher):
    cfg = compose(["experiment=smoke", "generator=lora_from_teacher", "generator.target_modules=[to_q,attn_proj]"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match=r"generator.lora target_modules \['attn_proj'\] match no module") as e:
        validate_with_teacher(cfg, tiny_teacher)
    assert "\n" not in str(e.value)


def test_memory_switches_apply(tiny_teacher):
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from ddstrans.savers import apply_teacher_savers

    z = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    emb = tiny_teacher.encode_prompts(["a photo of a cat"])
    ref = tiny_teacher.predict_noise(z, t, emb)
    apply_teacher_savers(tiny_teacher, {"attention": "eager", "channels_last": True})
    assert all(isinstance(p, AttnProcessor) for p in tiny_teacher.unet.attn_processors.values())
    assert tiny_teacher.channels_last
    torch.testing.assert_close(tiny_teacher.predict_noise(z, t, emb), ref, atol=1e-5, rtol=1e-5)
    apply_teacher_savers(tiny_teacher, {"attention": "sdpa"})
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_teacher.unet.attn_processors.values())
