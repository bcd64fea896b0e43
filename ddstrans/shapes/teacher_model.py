"""The shapes teacher's model: building it, starting it from another teacher, encoding captions with gradients,
probing its samples, and writing it as a diffusers folder.

Apart from the training loop (``ddstrans.shapes.train_teacher``) so the loop reads as the objective and its
bookkeeping alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ddstrans.shapes.world import VOCAB, from_model
from ddstrans.teacher import ddim_cfg_loop, ddim_scheduler
from ddstrans.word_tokenizer import make_word_tokenizer


def build_models(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_word_tokenizer(VOCAB, model_max_length=16)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.text_dim,
        intermediate_size=args.text_dim * 2,
        num_hidden_layers=args.text_layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=args.text_dim,
    )
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(text_config)
    ch = tuple(int(c) for c in args.channels.split(","))
    assert args.attn_from >= 1, "no attention at 32x32 (too slow on CPU)"
    down = tuple("CrossAttnDownBlock2D" if i >= args.attn_from else "DownBlock2D" for i in range(len(ch)))
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=ch,
        layers_per_block=args.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=args.text_dim,
        attention_head_dim=args.head_dim,
        norm_num_groups=8,
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=2) if args.text_time_embed else {}),
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type=args.prediction_type, clip_sample=True,
    )
    return tokenizer, text_encoder, unet, scheduler


def init_from(src: Path, unet, text_encoder) -> None:
    """Fine-tuning start: copy matching weights from a teacher folder; zero a new text-time embedding's output."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    old_unet = UNet2DConditionModel.from_pretrained(src / "unet")
    missing, unexpected = unet.load_state_dict(old_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("add_embedding.") for k in missing):
        raise SystemExit(f"--init-from {src}: architectures differ beyond the text-time embedding "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if missing:  # new text-time embedding: output exactly 0 at the start (its LayerNorm scaled to 0)
        torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
        torch.nn.init.zeros_(unet.add_embedding.norm2.bias)
    text_encoder.load_state_dict(CLIPTextModel.from_pretrained(src / "text_encoder").state_dict())
    print(f"initialised from {src} ({len(missing)} new tensors)", flush=True)


def encode(tokenizer, text_encoder, prompts):
    """Prompt embeddings *with* gradients: the text encoder trains here (``ddstrans.teacher.encode_text`` runs
    under ``no_grad`` for the frozen teacher)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def probe(tokenizer, text_encoder, unet, scheduler, args) -> float:
    """Fraction of samples with the right color *and* shape, ``--probe-n`` per caption (all 24).

    Fixed noise (seeded by ``--seed``) so that probes at different steps compare like with like.
    """
    from ddstrans.shapes import all_captions, parse_caption
    from ddstrans.shapes import metrics as M

    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    caps = [c for c in all_captions() for _ in range(args.probe_n)]
    g = torch.Generator().manual_seed(args.seed + 1)
    z = torch.randn(len(caps), 3, 32, 32, generator=g)
    emb = encode(tokenizer, text_encoder, caps)
    unc = encode(tokenizer, text_encoder, [""]).expand_as(emb)
    x = from_model(ddim_cfg_loop(unet, ddim_scheduler(scheduler, args.probe_steps), z, emb, unc, args.probe_guidance))
    colors, shapes = M.classify_color(x), M.classify_shape(x)
    right = [parse_caption(c)["color"] == col and parse_caption(c)["shape"] == shp for c, col, shp in zip(caps, colors, shapes)]
    if was_training:
        unet.train()
        text_encoder.train()
    return float(np.mean(right))


@contextlib.contextmanager
def swapped_in(params, ema_params):
    """The EMA weights in ``params`` for the duration (probe, export)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema_params):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


def export(out: Path, tokenizer, text_encoder, unet, scheduler, ema_params, params):
    """Write the diffusers folder with the EMA weights; each subfolder is swapped in atomically."""
    with swapped_in(params, ema_params):
        stage = out / "_train_state" / "export"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        unet.save_pretrained(stage / "unet")
        text_encoder.save_pretrained(stage / "text_encoder")
        tokenizer.save_pretrained(stage / "tokenizer")
        scheduler.save_pretrained(stage / "scheduler")
        import diffusers
        import transformers

        index = {
            "_class_name": "ShapesTeacher",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "_transformers_version": transformers.__version__,
        }
        (stage / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in ("unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
            dst = out / name
            old = out / "_train_state" / (name + ".old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if dst.exists():
                os.replace(dst, old)
            os.replace(stage / name, dst)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
