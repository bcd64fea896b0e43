"""Tiny randomly initialised Stable-Diffusion-style teachers, for tests and the ``smoke`` experiment.

Why: real weights cannot be downloaded here, yet loading must go through the real code path. These are
written with ``StableDiffusionPipeline.save_pretrained`` exactly as a real checkpoint directory is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_WORDS = (
    "a photo of the cat dog lion squirrel red blue green yellow circle square triangle on striped "
    "checkered background"
).split()


def make_tiny_sd(
    out_dir: str | Path,
    *,
    prediction_type: str = "epsilon",
    with_vae: bool = True,
    sample_size: int = 8,
    seed: int = 0,
) -> Path:
    """Write a tiny random SD-style teacher (``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``,
    optional ``vae``) to ``out_dir`` and return the path. Image size = ``sample_size`` x VAE factor (2)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddstrans.word_tokenizer import make_word_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    latent_channels = 4 if with_vae else 3
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        num_train_timesteps=1000, clip_sample=False, steps_offset=1,
    )
    tokenizer = make_word_tokenizer(TINY_WORDS, model_max_length=12)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    if with_vae:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=sample_size * 2,
        )
        pipe = StableDiffusionPipeline(
            unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        unet.save_pretrained(out_dir / "unet")
        scheduler.save_pretrained(out_dir / "scheduler")
        text_encoder.save_pretrained(out_dir / "text_encoder")
        tokenizer.save_pretrained(out_dir / "tokenizer")
    return out_dir


def tiny_random_teacher(cache_dir: str, prediction_type: str = "epsilon", with_vae: bool = True, seed: int = 0):
    """Load the tiny random teacher from ``cache_dir``, writing it first if absent (atomic: safe when several
    DDP processes start at once)."""
    from ddstrans.teacher import Teacher

    root = Path(cache_dir).expanduser() / f"{prediction_type}{'' if with_vae else '-pixel'}-s{seed}"
    if not (root / "unet").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        make_tiny_sd(tmp / "t", prediction_type=prediction_type, with_vae=with_vae,
                     sample_size=8 if with_vae else 16, seed=seed)
        try:
            os.replace(tmp / "t", root)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return Teacher.from_pretrained(root)


# ---------------------------------------------------------------------------------------------- metric models
def make_tiny_clip(out_dir: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` with its word tokenizer and image-processor config (``save_pretrained``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ddstrans.word_tokenizer import make_word_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tok = make_word_tokenizer(TINY_WORDS, model_max_length=12)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(out_dir)
    return out_dir


def make_tiny_dino(out_dir: str | Path, *, kind: str = "vit", image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random DINO-style ``ViTModel`` (``kind="vit"``) or ``Dinov2Model`` (``kind="dinov2"``)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=8)
    if kind == "vit":
        model = ViTModel(ViTConfig(intermediate_size=64, **common), add_pooling_layer=False)
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
    else:
        raise ValueError(f"kind must be 'vit' or 'dinov2', got {kind!r}")
    model.save_pretrained(out_dir)
    return out_dir


class TinyInception(torch.nn.Module):
    """An Inception-like feature network with the FID Inception's call: ``net(x, return_features=True)`` on
    images in [0, 255] -> (B, 16) pooled features (``net(x)``: 10 logits)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv1(x / 128.0 - 1.0))
        feats = torch.relu(self.conv2(h)).mean(dim=(2, 3))
        if return_features:
            return feats
        return self.fc(feats)


def make_tiny_inception(path: str | Path, *, seed: int = 0) -> Path:
    """Write ``TinyInception`` as a TorchScript file (the format of the FID Inception ``inception-2015-12-05.pt``)."""
    path = Path(path)
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(path))
    return path
