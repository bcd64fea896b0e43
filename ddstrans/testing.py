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


SHAPES_TASKS = ("to_blue", "to_red", "to_yellow", "to_square", "to_checkered")


def make_shapes_checkpoint(path: str | Path, *, seed: int = 0, conditioning: str = "task_id",
                           teacher_root: str | Path | None = None, tasks: list[dict] | None = None) -> Path:
    """Write a training checkpoint (the layout ``ddstrans-train`` saves) of a *random, non-identity* generator of
    the shapes translator's architecture (32x32 pixels, ``configs/generator/shapes.yaml``) with the five shapes
    tasks: what ``ddstrans export`` reads, without a training run. Returns ``path``.
    ``conditioning="text"`` needs ``teacher_root`` (a teacher with ``text_encoder/`` and ``tokenizer/`` of width
    64 and 16 tokens, as ``checkpoints/shapes-teacher``), whose text encoder the export copies. ``tasks``: task
    dicts (name, source, target, rewrite) instead of the five shapes task names with caption prompts."""
    from ddstrans.generator import build_generator

    torch.manual_seed(seed)
    if tasks is None:
        tasks = [{"name": n, "source": ["{caption}"], "target": ["{caption}"], "rewrite": None} for n in SHAPES_TASKS]
    gen = build_generator(
        conditioning=conditioning, num_tasks=len(tasks), in_channels=3, sample_size=32, cross_attention_dim=64,
        block_out_channels=(32, 64, 64), layers_per_block=1, num_task_tokens=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    torch.nn.init.normal_(gen.unet.conv_out.weight, std=0.05)  # not the identity
    emb = torch.randn(len(tasks), 1, 16, 64)
    ckpt = {
        "global_step": 0,
        "state_dict": {f"generator.{k}": v for k, v in gen.state_dict().items()},
        "ema": {"shadow_params": [p.detach().clone() for p in gen.parameters()]},
        "ddstrans": {
            "format": 1, "generator_class": "TranslationUNet",
            "generator_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in gen.config.items()
                                 if not k.startswith("_")},
            "tasks": {"tasks": tasks, "meta": {}},
            "task_tensors": {"source": emb, "target": emb.clone(), "n_source": torch.ones(len(tasks), dtype=torch.long),
                             "n_target": torch.ones(len(tasks), dtype=torch.long)},
            "teacher": {"source": "checkpoints/shapes-teacher", "root": str(teacher_root) if teacher_root else None, "prediction_type": "v_prediction",
                        "latent_channels": 3, "downsample_factor": 1, "latent_scale": 1.0, "image_size": 32,
                        "has_vae": False},
            "run_config": {"task_name": "shapes", "seed": seed, "trainer": {"max_steps": 0},
                           "data": {"_target_": "ddstrans.shapes.data.ShapesDataModule", "batch_size": 16}},
            "metrics": {},
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def tiny_random_teacher(cache_dir: str, prediction_type: str = "epsilon", with_vae: bool = True, seed: int = 0):
    """Load the tiny random teacher from ``cache_dir``, writing it first if absent (atomic: safe when several
    DDP processes start at once)."""
    from ddstrans.teacher import Teacher

    root = Path(cache_dir).expanduser() / f"{prediction_type}{'' if with_vae else '-pixel'}-s{seed}"
    if not (root / "unet").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        # its own RNG: the run that writes the teacher must draw what the runs that load it draw afterwards
        with torch.random.fork_rng(devices=[]):
            make_tiny_sd(tmp / "t", prediction_type=prediction_type, with_vae=with_vae,
                         sample_size=8 if with_vae else 16, seed=seed)
        try:
            os.replace(tmp / "t", root)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return Teacher.from_pretrained(root)


def make_word_t5_tokenizer(words=TINY_WORDS, model_max_length: int = 16):
    """A T5 tokenizer (Unigram, as T5's) whose vocabulary is ``words`` plus single letters; built locally."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_vae(latent_channels: int, sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=sample_size * 2, **kw,
    )


def _tiny_clip(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _tiny_t5(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def make_tiny_sdxl(out_dir: str | Path, *, sample_size: int = 8, seed: int = 0, force_zeros: bool = True) -> Path:
    """A tiny random SDXL teacher (two CLIP encoders, text_time micro-conditioning), written by
    ``StableDiffusionXLPipeline.save_pretrained``. Image size = ``sample_size`` x 2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from ddstrans.word_tokenizer import make_word_tokenizer

    torch.manual_seed(seed)
    tok, tok2 = make_word_tokenizer(TINY_WORDS, 12), make_word_tokenizer(TINY_WORDS, 12)
    te, te2 = _tiny_clip(tok, 16), _tiny_clip(tok2, 16, projection=16)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32, norm_num_groups=8,
    )
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(4, sample_size), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_sd3(out_dir: str | Path, *, sample_size: int = 8, seed: int = 0, with_t5: bool = True) -> Path:
    """A tiny random SD3 teacher (two CLIP encoders + optional T5, 16-channel VAE with shift), written by
    ``StableDiffusion3Pipeline.save_pretrained``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ddstrans.word_tokenizer import make_word_tokenizer

    torch.manual_seed(seed)
    tok, tok2 = make_word_tokenizer(TINY_WORDS, 12), make_word_tokenizer(TINY_WORDS, 12)
    te, te2 = _tiny_clip(tok, 16, projection=16), _tiny_clip(tok2, 16, projection=16)
    tok3 = make_word_t5_tokenizer(model_max_length=16) if with_t5 else None
    te3 = _tiny_t5(tok3) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32,
    )
    vae = _tiny_vae(16, sample_size, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                    use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_flux(out_dir: str | Path, *, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """A tiny random Flux teacher (``guidance_embeds`` True: as Flux-dev, with Flux-dev's dynamic shift; False: as
    Flux-schnell), written by ``FluxPipeline.save_pretrained``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from ddstrans.word_tokenizer import make_word_tokenizer

    torch.manual_seed(seed)
    tok = make_word_tokenizer(TINY_WORDS, 12)
    tok2 = make_word_t5_tokenizer(model_max_length=16)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8],
    )
    if guidance_embeds:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    vae = _tiny_vae(16, 8, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=_tiny_clip(tok, 32),
                        tokenizer=tok, text_encoder_2=_tiny_t5(tok2), tokenizer_2=tok2)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


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
