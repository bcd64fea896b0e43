"""The shapes teacher's model card (``README.md`` of its directory): written by its training, whose figures it
states, with a quality section that the teacher's evaluation fills in and training keeps."""

from __future__ import annotations

import os
from pathlib import Path

QUALITY_BEGIN = "<!-- quality:begin -->"
QUALITY_END = "<!-- quality:end -->"


def write_card(out: Path, info: dict):
    """Model card; keeps an existing quality section (written by ``python -m ddstrans.shapes.eval_teacher``)."""
    info = dict(info)
    info["conditioning"] = (
        "\nThe caption reaches the UNet twice: cross-attention (at 8x8) and an attention-pooled caption embedding "
        "added to the time embedding (`addition_embed_type=\"text\"`), which every ResNet block sees."
        if info.get("text_time_embed") else "")
    best = info.get("best")
    info["snapshot"] = (
        f"\nThe exported weights are the EMA at step {best['step']}, the best of the probes run every "
        f"few hundred steps ({info['probe_n']} DDIM-{info['probe_steps']} samples per caption, guidance "
        f"{info['probe_guidance']:g}: color and shape right in "
        f"{best['score']:.1%}; log in `probe_log.csv`), not necessarily the last step's."
        if best and best.get("step") else "")
    card = out / "README.md"
    quality = f"{QUALITY_BEGIN}\n_Not measured yet: run `python -m ddstrans.shapes.eval_teacher`._\n{QUALITY_END}"
    if card.exists():
        old = card.read_text()
        if QUALITY_BEGIN in old and QUALITY_END in old:
            quality = old[old.index(QUALITY_BEGIN): old.index(QUALITY_END) + len(QUALITY_END)]
    text = f"""# shapes-teacher

A tiny text-conditioned **pixel-space** diffusion model of the shapes world
(`ddstrans.shapes`: one light red/green/blue/yellow circle/square/triangle on a striped or checkered
background of dark grays, 32x32, captions like "a red circle on a striped background"). It is the default teacher
of ddstrans: load it with `ddstrans.Teacher.from_pretrained("checkpoints/shapes-teacher")`.
There is no VAE: latents are pixels in [-1, 1].

| part | class | notes |
|---|---|---|
| `unet/` | `diffusers.UNet2DConditionModel` | in/out 3 channels, 32x32, blocks {info['channels']}, {info['attn']}, {info['unet_params']:,} params |
| `text_encoder/` | `transformers.CLIPTextModel` | {info['text_layers']} layers, width {info['text_dim']}, trained jointly, {info['text_params']:,} params |
| `tokenizer/` | `transformers.CLIPTokenizer` | `ddstrans.word_tokenizer.make_word_tokenizer` over the grammar's words, max length 16 |
| `scheduler/` | `diffusers.DDPMScheduler` | {info['prediction_type'].replace('_', ' ')}, 1000 steps, linear betas 1e-4..0.02 |

The unconditional prompt is `""` (captions were dropped with probability {info['cond_drop']} in training).
Weights are an EMA (decay {info['ema']}) of the trained weights.{info['conditioning']}{info['snapshot']}

## Training

```
{info['command']}
```

- steps: {info['step']} of {info['steps']} at batch {info['batch_size']} (seed {info['seed']}, {info['threads']} CPU thread(s))
- wall time: {info['wall_min']:.1f} min (summed over resumed runs) on a 2-core CPU machine
- final loss (mean of the last 100 steps' batch MSE): {info['final_loss']:.4f}
- loss log: `train_log.csv` (step, loss, lr, elapsed seconds)

## Quality (measured)

{quality}
"""
    tmp = card.with_name("README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, card)


def write_quality(teacher_dir: Path, text: str):
    """Replace the quality section of ``<teacher_dir>/README.md`` with ``text`` (atomic)."""
    card = teacher_dir / "README.md"
    old = card.read_text() if card.exists() else f"# shapes-teacher\n\n## Quality (measured)\n\n{QUALITY_BEGIN}\n{QUALITY_END}\n"
    if QUALITY_BEGIN not in old:
        old += f"\n## Quality (measured)\n\n{QUALITY_BEGIN}\n{QUALITY_END}\n"
    a, b = old.index(QUALITY_BEGIN), old.index(QUALITY_END) + len(QUALITY_END)
    new = old[:a] + f"{QUALITY_BEGIN}\n{text}\n{QUALITY_END}" + old[b:]
    tmp = card.with_name("README.md.tmp")
    tmp.write_text(new)
    os.replace(tmp, card)
