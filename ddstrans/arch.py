"""Randomly initialised teachers with the exact architecture of real ones, from configs kept in the repository.

Why: memory and speed at full size can be measured and predicted without downloading weights. The diffusers /
transformers configs of Stable Diffusion 1.5 (UNet, VAE, CLIP ViT-L/14 text encoder, PNDM scheduler) and of the
SDXL UNet, VAE and text encoders are in ``configs/arch/<name>/*.json``. The tokenizer is a locally built
word-level CLIP tokenizer (77 tokens, the ``ddstrans.testing`` vocabulary), not CLIP's BPE vocabulary: the text
encoder's architecture (49,408-entry embedding) is exact, its inputs use the first few hundred ids.

``width_divisor`` > 1 divides every channel width (UNet, VAE, text encoder) and keeps the layout: block types,
layers per block, attention head width, depth — the fast variant the default test suite runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "arch"
ARCHS = ("sd15", "sdxl")


def arch_config(arch: str, part: str) -> dict:
    path = ARCH_DIR / arch / f"{part}.json"
    if not path.is_file():
        raise ValueError(f"no architecture config {path} (arch must be one of {ARCHS})")
    return json.loads(path.read_text())


def narrowed(cfg: dict, width_divisor: int, kind: str) -> dict:
    """``cfg`` with channel widths divided by ``width_divisor`` (group norms and heads kept valid)."""
    if width_divisor == 1:
        return cfg
    d = int(width_divisor)
    c = dict(cfg)
    if kind in ("unet", "vae"):
        c["block_out_channels"] = [max(8, ch // d // 8 * 8) for ch in cfg["block_out_channels"]]
        c["norm_num_groups"] = next(g for g in (32, 16, 8) if all(ch % g == 0 for ch in c["block_out_channels"]))
    if kind == "unet":
        c["cross_attention_dim"] = max(32, cfg["cross_attention_dim"] // d // 8 * 8)  # = the text width
    if kind == "text":
        c["hidden_size"] = max(32, cfg["hidden_size"] // d // 8 * 8)
        c["intermediate_size"] = max(64, cfg["intermediate_size"] // d)
        c["num_attention_heads"] = 4
        c["projection_dim"] = c["hidden_size"]
    return c


def make_random_sd15(out_dir: str | Path, *, width_divisor: int = 1, seed: int = 0) -> Path:
    """Write a random SD-1.5-architecture teacher (diffusers layout, safetensors) to ``out_dir``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddstrans.testing import TINY_WORDS
    from ddstrans.word_tokenizer import make_word_tokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    ucfg = narrowed(arch_config("sd15", "unet"), width_divisor, "unet")
    tcfg = narrowed(arch_config("sd15", "text_encoder"), width_divisor, "text")
    vcfg = narrowed(arch_config("sd15", "vae"), width_divisor, "vae")
    tokenizer = make_word_tokenizer(TINY_WORDS, model_max_length=77)
    tcfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    for name, build in (("unet", lambda: UNet2DConditionModel.from_config(ucfg)),
                        ("vae", lambda: AutoencoderKL.from_config(vcfg)),
                        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**{k: v for k, v in tcfg.items()
                                                                                 if k != "architectures"})))):
        model = build()
        model.save_pretrained(out / name, safe_serialization=True)
        del model
    PNDMScheduler.from_config(arch_config("sd15", "scheduler")).save_pretrained(out / "scheduler")
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, indent=2))
    return out
