"""Train the shapes-world teacher: a tiny text-conditioned pixel-space diffusion model.

Writes a diffusers-format folder (``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``,
``model_index.json``, safetensors weights) that ``ddstrans.Teacher.from_pretrained`` loads, plus
``train_log.csv`` (loss as it goes) and the model card ``README.md``.

- Data: scenes rendered on the fly by :mod:`ddstrans.shapes` from seeds of ``seeds.TEACHER_TRAIN`` (disjoint from
  the translator's training scenes and from the held-out evaluation scenes), images in [-1, 1], 32x32.
- Objective: epsilon prediction (``--prediction-type v_prediction``: v = sqrt(abar) eps - sqrt(1 - abar) x0, whose
  error does not blow up at high noise), DDPM linear schedule, 1000 steps, timesteps uniform.
- CFG: the caption is replaced by "" (the unconditional prompt) with probability ``--cond-drop``.
- The text encoder (a tiny ``CLIPTextModel``) is trained jointly; the exported weights are an
  exponential moving average of the trained ones: ``decay = min(--ema, (1 + k) / (10 + k))`` at step ``k``, one
  ``lerp`` over all tensors. Not ``diffusers.training_utils.EMAModel`` (which the translator's EMA uses): its first
  update uses decay 0 and another update formula, so the shipped teacher's recorded command would no longer
  reproduce it.
- Learning rate: ``ddstrans.schedules.warmup_cosine_at`` (linear warm-up, cosine to ``--min-lr-frac``).
- The model (building, probing, the diffusers export) is ``ddstrans.shapes.teacher_model``; this module holds the
  command line and the training loop.
- Seeded and exactly resumable: every batch is derived from ``(seed, step)``; the state (weights,
  EMA, optimizer, step, elapsed time) is saved every ``--save-every-min`` minutes to
  ``<out>/_train_state/state.pt`` atomically (write temp, ``os.replace``), and rerunning the same
  command continues from it. The exported model is refreshed at each save, too.
- ``torch.set_num_threads(1)`` by default (``--threads``).

Example (the shipped teacher's command is recorded in its README.md)::

    python -m ddstrans.shapes.train_teacher --out checkpoints/shapes-teacher --steps 4000
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddstrans.callbacks import atomic_torch_save
from ddstrans.noising import add_noise, velocity
from ddstrans.schedules import warmup_cosine_at
from ddstrans.shapes.card import write_card
from ddstrans.shapes.seeds import TEACHER_TRAIN
from ddstrans.shapes.teacher_model import build_models, encode, export, init_from, probe, swapped_in
from ddstrans.shapes.world import render_batch, to_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/shapes-teacher")
    p.add_argument("--steps", type=int, default=4000, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay floor (fraction of lr)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cond-drop", type=float, default=0.15, help="probability of the empty prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", default="32,64,96", help="UNet block_out_channels")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attn-from", type=int, default=2,
                   help="first level (0 = 32x32) with attention; 2 = only 8x8 (and the mid block); never 0 (too slow on CPU)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="what the UNet predicts (written to the scheduler config; ddstrans.Teacher converts v to "
                        "epsilon for DDS); a run resumes only with the prediction type it started with")
    p.add_argument("--text-time-embed", action="store_true",
                   help="also add an attention-pooled caption embedding to the time embedding (diffusers "
                        "addition_embed_type='text'), so every ResNet block at every resolution sees the caption; "
                        "binds global attributes (color) that cross-attention only at 8x8 did not")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every N steps sample --probe-n images per caption with the EMA weights and export only "
                        "when color-and-shape accuracy improves (best snapshot kept); 0 = export the last weights")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="with --probe-every: export the best-probed EMA snapshot (best) or, probes only logged, the "
                        "last step's EMA (last: for a probe too small to rank near-perfect snapshots, which saturates "
                        "at 100%% and would pin the export to the first snapshot that reaches it)")
    p.add_argument("--probe-n", type=int, default=4)
    p.add_argument("--probe-steps", type=int, default=10, help="DDIM steps of the probe's samples")
    p.add_argument("--probe-guidance", type=float, default=4.0,
                   help="guidance of the probe's samples (the card's sampling setting is DDIM 20 at guidance 2)")
    p.add_argument("--init-from", default="",
                   help="start from this diffusers teacher folder (weights whose names and shapes match); a text-time "
                        "embedding it lacks starts at zero output, so the model starts as the old one")
    p.add_argument("--t-high-frac", type=float, default=0.0,
                   help="fraction of timesteps drawn from [--t-high-min, 1000) instead of [0, 1000)")
    p.add_argument("--t-high-min", type=int, default=600)
    p.add_argument("--t-low-frac", type=float, default=0.0,
                   help="fraction of timesteps drawn from [0, 500) instead of [0, 1000)")
    p.add_argument("--save-every-min", type=float, default=5.0)
    p.add_argument("--time-limit-min", type=float, default=0.0, help="stop (and export) after this many minutes; 0 = none")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop (and export) after this step; the schedule still runs over --steps. Replays, on any "
                        "machine, a run that a time limit stopped (its card names the step); 0 = none")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--fresh", action="store_true", help="ignore an existing _train_state and start over")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite README.md from the saved state (pass the training command's arguments)")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------- training


def scene_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` scene seeds of ``seeds.TEACHER_TRAIN``, drawn uniformly."""
    return rng.integers(TEACHER_TRAIN.start, TEACHER_TRAIN.stop, size=n)


def make_batch(step, args, alphas_cumprod):
    """Batch of step ``step``: (noisy images, timesteps, the UNet's regression target, captions); depends only on
    (seed, step), so resuming is exact."""
    rng = np.random.default_rng([args.seed, step])
    imgs, _, caps = render_batch(scene_seeds(rng, args.batch_size))
    drop = rng.random(args.batch_size) < args.cond_drop
    caps = ["" if d else c for c, d in zip(caps, drop)]
    x0 = to_model(imgs)
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    t = torch.randint(0, 1000, (args.batch_size,), generator=g)
    if args.t_high_frac > 0:
        high = torch.rand(args.batch_size, generator=g) < args.t_high_frac
        t = torch.where(high, torch.randint(args.t_high_min, 1000, (args.batch_size,), generator=g), t)
    if args.t_low_frac > 0:
        low = torch.rand(args.batch_size, generator=g) < args.t_low_frac
        t = torch.where(low, torch.randint(0, 500, (args.batch_size,), generator=g), t)
    noise = torch.randn(x0.shape, generator=g)
    xt = add_noise(x0, noise, t, alphas_cumprod)
    target = noise if args.prediction_type == "epsilon" else velocity(x0, noise, t, alphas_cumprod)
    return xt, t, target, caps


def drop_rows_after(path: Path, step: int, header: bool) -> None:
    """Keep only the rows of a CSV log whose first column (the step) is <= ``step``.

    A run resumes from its last saved state, so rows written after that save (loss lines, probes) would be written
    again: without this the logs would repeat steps after every interruption.
    """
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head, body = (rows[:1], rows[1:]) if header else ([], rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(head + [r for r in body if r and int(r[0]) <= step])
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    state_dir = out / "_train_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.pt"
    cli = argv if argv is not None else sys.argv[1:]
    command = "python -m ddstrans.shapes.train_teacher " + " ".join(shlex.quote(a) for a in cli if a != "--card-only")

    tokenizer, text_encoder, unet, scheduler = build_models(args)
    if args.init_from:
        init_from(Path(args.init_from), unet, text_encoder)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    ema_params = [p.detach().clone() for p in params]
    step, elapsed, recent = 0, 0.0, []
    best = {"score": -1.0, "step": 0}

    if state_path.exists() and not args.fresh:
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        started = st.get("args", {}).get("prediction_type", "epsilon")
        if started != args.prediction_type:
            raise SystemExit(f"{state_path} was trained with --prediction-type {started}; resume with it, or start "
                             "a fresh run (--fresh, or another --out)")
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        for e, v in zip(ema_params, st["ema"]):
            e.copy_(v)
        step, elapsed, recent = st["step"], st["elapsed"], st.get("recent", [])
        best = st.get("best", best)
        print(f"resumed from {state_path} at step {step} ({elapsed / 60:.1f} min so far)", flush=True)
    elif args.fresh:
        for name in ("train_log.csv", "probe_log.csv"):
            if (out / name).exists():
                (out / name).unlink()

    n_levels = len(args.channels.split(","))
    res = [32 >> i for i in range(args.attn_from, n_levels)]
    attn_desc = ("self- and cross-attention only at " + " and ".join(f"{r}x{r}" for r in res)
                 + f" (and the {32 >> (n_levels - 1)}x{32 >> (n_levels - 1)} mid block)")
    unet_params = sum(p.numel() for p in unet.parameters())
    text_params = sum(p.numel() for p in text_encoder.parameters())
    print(f"unet {unet_params:,} params, text encoder {text_params:,} params, threads {torch.get_num_threads()}", flush=True)

    exports_last = not args.probe_every or args.keep == "last"

    def info_for(step, elapsed, recent):
        return dict(
            command=command, channels=args.channels, attn=attn_desc, unet_params=unet_params, text_params=text_params,
            text_layers=args.text_layers, text_dim=args.text_dim, cond_drop=args.cond_drop, ema=args.ema,
            step=step, steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
            wall_min=elapsed / 60, final_loss=float(np.mean(recent[-100:])) if recent else float("nan"),
            text_time_embed=args.text_time_embed, prediction_type=args.prediction_type, best=None if exports_last else dict(best),
            probe_n=args.probe_n, probe_steps=args.probe_steps, probe_guidance=args.probe_guidance,
        )

    def info():
        return info_for(step, elapsed, recent)

    if args.card_only:
        if not state_path.exists():
            raise SystemExit(f"no training state at {state_path}")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        command = saved.get("command", command)
        best.update(saved.get("best", best))
        write_card(out, info_for(saved["step"], saved["elapsed"], saved.get("recent", [])))
        print(f"wrote {out / 'README.md'}")
        return

    log_path = out / "train_log.csv"
    if step:  # resumed: rows written after the saved step would be written again
        drop_rows_after(log_path, step, header=True)
        drop_rows_after(out / "probe_log.csv", step, header=False)
    new_log = not log_path.exists()
    log_f = open(log_path, "a", newline="")
    writer = csv.writer(log_f)
    if new_log:
        writer.writerow(["step", "loss", "lr", "elapsed_s"])

    def save():
        atomic_torch_save(
            {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
             "ema": ema_params, "step": step, "elapsed": elapsed, "recent": recent[-200:], "args": vars(args),
             "command": command, "best": best},
            state_path,
        )
        if exports_last:
            export(out, tokenizer, text_encoder, unet, scheduler, ema_params, params)
        write_card(out, info())

    def probe_and_keep_best():
        """Probe the EMA weights; with ``--keep best``, export them when they beat the best snapshot so far."""
        with swapped_in(params, ema_params):
            score = probe(tokenizer, text_encoder, unet, scheduler, args)
        improved = score > best["score"] and not exports_last
        with open(out / "probe_log.csv", "a") as f:
            f.write(f"{step},{score:.4f},{int(improved)}\n")
        note = (" (logged; --keep last)" if exports_last else " (best; exported)" if improved
                else f" (best {best['score']:.3f} at {best['step']})")
        tqdm.write(f"probe at step {step}: color-and-shape right {score:.3f}" + note)
        if improved:
            best.update(score=score, step=step)
            export(out, tokenizer, text_encoder, unet, scheduler, ema_params, params)
            write_card(out, info())  # the card names the exported step: never the previous best's

    unet.train()
    text_encoder.train()
    t_run0 = time.time()
    elapsed0 = elapsed
    last_save = time.time()
    pbar = tqdm(total=args.steps, initial=step, desc="teacher", dynamic_ncols=True, mininterval=5)
    while step < args.steps:
        xt, t, target, caps = make_batch(step, args, alphas_cumprod)
        lr = warmup_cosine_at(step, args.lr, args.warmup, args.steps, args.min_lr_frac)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        emb = encode(tokenizer, text_encoder, caps)
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        elapsed = elapsed0 + (time.time() - t_run0)
        recent.append(loss.item())
        recent = recent[-200:]
        if step % args.log_every == 0 or step == args.steps:
            writer.writerow([step, f"{np.mean(recent[-args.log_every:]):.5f}", f"{lr:.6g}", f"{elapsed:.1f}"])
            log_f.flush()
        pbar.update(1)
        pbar.set_postfix(loss=f"{np.mean(recent[-50:]):.4f}", lr=f"{lr:.2e}")
        if args.probe_every and step % args.probe_every == 0:
            probe_and_keep_best()
        if time.time() - last_save > args.save_every_min * 60:
            save()
            last_save = time.time()
        if args.time_limit_min and (time.time() - t_run0) > args.time_limit_min * 60:
            print(f"time limit reached at step {step}", flush=True)
            break
        if args.stop_at and step >= args.stop_at:
            print(f"stopped at step {step} (--stop-at)", flush=True)
            break
    pbar.close()
    if args.probe_every and step % args.probe_every != 0:  # the last step was not probed yet
        probe_and_keep_best()
    save()
    log_f.close()
    i = info()
    print(f"done: step {step}, wall {i['wall_min']:.1f} min, final loss {i['final_loss']:.4f}; exported to {out}", flush=True)


if __name__ == "__main__":
    main()
