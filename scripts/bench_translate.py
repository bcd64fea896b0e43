#!/usr/bin/env python
"""Single-pass translation speed vs per-image DDS editing, on the same teacher.

(1) an exported ``Translator`` (``--translator DIR``; without it, one is exported from a quickly built module:
    one Lightning training step, ``trainer.save_checkpoint``, ``ddstrans.export.export_checkpoint``,
    ``Translator.from_pretrained`` — the real path): latency at batch 1 and images/s at ``--batch`` (tensor path
    ``translate_tensor``: VAE encode -> one generator pass -> VAE decode; PIL resizing excluded);
(2) zero-shot editing of one image with ``ddstrans.editing`` (VAE encode -> ``--edit-steps`` DDS steps, 200 by
    default as the reference -> decode). With fewer measured steps (``--quick`` or ``--measure-steps``), the
    200-step latency is EXTRAPOLATED from the measured per-step time and labelled so.

Rounds interleave the variants (noise hits all alike); medians are reported. The last line is
``edit_over_single_pass=<edit latency / single-pass latency at batch 1:.1f>``.

    python scripts/bench_translate.py --quick                    # shapes teacher (or tiny), ~30 s on CPU
    python scripts/bench_translate.py --translator checkpoints/my-translator --arch shapes
    python scripts/bench_translate.py --arch sd15 --device cuda --dtype bf16 --batch 8   # on a GPU

For ``--arch sd15`` (random SD-1.5-shaped teacher and generator) the translator is assembled in memory from the
module (exporting 3.4 GB of random weights would only time the disk); the timed code is the same ``Translator``.

``--backends eager,compile,onnx`` compares instead the ways to run one exported translator: PyTorch eager,
``torch.compile`` of the generator, and ONNX Runtime (``backend="onnx"``), images/s at batch 1 and ``--batch``
(tensor path) and each backend's max abs difference from eager on the same inputs. ``--translator`` must then hold
``onnx/`` (``ddstrans export --onnx``); without it a random generator of the shapes translator's architecture is
exported with ``--onnx`` to a temp dir (speed does not depend on the weights). Last line ``onnx_over_eager=R``
(images/s ratio at ``--batch``).

    python scripts/bench_translate.py --backends eager,compile,onnx --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step.setups import build_setup, make_loader, make_module, make_sync, quiet


def build_translator(setup, module, workdir: Path, device, dtype, export: bool):
    """Export a (one-step-trained) module through the real checkpoint -> export -> load path, or assemble it."""
    from ddstrans.translator import Translator

    if not export:
        tr = Translator(copy.deepcopy(module.generator), module.task_table,
                        {"resolution": setup.image_size(), "conditioning": module.generator.config.conditioning,
                         "latent_scale": setup.teacher.latent_scale}, vae=setup.teacher.vae)
        return tr.to(device, dtype if device.type == "cuda" else None), "assembled in memory (not exported)"
    import lightning as L

    loader = make_loader(setup, 2, 1, "latents")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, logger=False,
                        default_root_dir=str(workdir))
    trainer.fit(module, train_dataloaders=loader)
    ckpt = workdir / "one_step.ckpt"
    trainer.save_checkpoint(ckpt)
    from ddstrans.export import export_checkpoint

    out = export_checkpoint(ckpt, workdir / "translator", overwrite=True)
    tr = Translator.from_pretrained(out, device=device, dtype=dtype if device.type == "cuda" else None)
    return tr, f"exported to a temp dir from a 1-step module ({out.name})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--translator", default=None, help="an exported translator directory (default: export one)")
    ap.add_argument("--arch", choices=("tiny", "shapes", "sd15"), default="shapes",
                    help="teacher for editing (and for the exported translator when --translator is not given)")
    ap.add_argument("--quick", action="store_true", help="10 measured edit steps (extrapolated to --edit-steps), 3 rounds")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch for images/s (batch 1 is always measured)")
    ap.add_argument("--edit-steps", type=int, default=200, help="steps of the editing baseline (reference: 200)")
    ap.add_argument("--measure-steps", type=int, default=None,
                    help="edit steps actually run per round (default: --edit-steps; --quick: 10); fewer = extrapolated")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default=None, help="default: bf16 on CUDA, float32 on CPU")
    ap.add_argument("--sd15-base", type=int, default=320)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--backends", default=None,
                    help="compare running backends of one translator instead (comma list of eager, compile, onnx)")
    args = ap.parse_args(argv)
    if args.backends:
        return bench_backends(args)
    quiet()
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "float32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    rounds = args.rounds or (3 if args.quick else 5)
    n_meas = args.measure_steps or (min(10, args.edit_steps) if args.quick else args.edit_steps)
    sync = make_sync(device)

    with tempfile.TemporaryDirectory(prefix="ddstrans-bench-tr-") as td:
        workdir = Path(td)
        os.environ.setdefault("DDSTRANS_CACHE", str(workdir / "cache"))
        setup = build_setup(args.arch, device, dtype, workdir, "off", args.sd15_base)
        teacher = setup.teacher
        if args.translator:
            from ddstrans.translator import Translator

            tr = Translator.from_pretrained(args.translator, device=device, dtype=dtype if device.type == "cuda" else None)
            how = f"loaded from {args.translator}"
        else:
            module = make_module(setup, device=device)
            tr, how = build_translator(setup, module, workdir, device, dtype, export=setup.arch != "sd15")
        teacher.to(device, dtype if device.type == "cuda" else torch.float32)
        task = tr.tasks[0]
        spec = next((t for t in setup.tasks if t["name"] == task), setup.tasks[0])
        src = spec["source"] if isinstance(spec["source"], str) else spec["source"][0]
        tgt = spec["target"] if isinstance(spec["target"], str) else spec["target"][0]
        res_px = tr.resolution
        g = torch.Generator().manual_seed(0)
        x1 = (torch.rand(1, 3, res_px, res_px, generator=g) * 2 - 1).to(device)
        xb = (torch.rand(args.batch, 3, res_px, res_px, generator=g) * 2 - 1).to(device)
        from ddstrans.editing import EditConfig, edit_latents

        emb_src, emb_tgt = teacher.encode_prompts([src]), teacher.encode_prompts([tgt])  # cached, as in `ddstrans edit`
        cfg = EditConfig(steps=n_meas)

        def translate(x):
            return lambda: tr.translate_tensor(x, task)

        def edit_parts():
            sync()
            t0 = time.perf_counter()
            z = teacher.encode_images(x1)
            sync()
            t1 = time.perf_counter()
            z = edit_latents(teacher, z, emb_src, emb_tgt, cfg)
            sync()
            t2 = time.perf_counter()
            teacher.decode_latents(z)
            sync()
            t3 = time.perf_counter()
            return (t1 - t0) + (t3 - t2), t2 - t1

        def timed(fn):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        with torch.inference_mode():
            translate(x1)()
            translate(xb)()
        edit_parts()  # warm-up
        t1s, tbs, codec, loops = [], [], [], []
        for _ in range(rounds):
            with torch.inference_mode():
                t1s += [timed(translate(x1)) for _ in range(3)]
                tbs.append(timed(translate(xb)))
            c, lp = edit_parts()
            codec.append(c)
            loops.append(lp)
        lat1 = statistics.median(t1s)
        latb = statistics.median(tbs)
        per_step = statistics.median(loops) / n_meas
        enc_dec = statistics.median(codec)
        edit_lat = enc_dec + per_step * args.edit_steps
        extrapolated = n_meas != args.edit_steps
        res = {"arch": setup.arch, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "translator": how,
               "resolution": res_px, "threads": torch.get_num_threads(), "rounds": rounds,
               "generator_params_m": sum(p.numel() for p in tr.generator.parameters()) / 1e6,
               "teacher_unet_params_m": sum(p.numel() for p in teacher.unet.parameters()) / 1e6,
               "single_pass_ms_b1": lat1 * 1e3, "single_pass_img_s_b1": 1 / lat1,
               "single_pass_ms_batch": latb * 1e3, "batch": args.batch, "single_pass_img_s_batch": args.batch / latb,
               "edit_steps": args.edit_steps, "edit_steps_measured": n_meas, "edit_extrapolated": extrapolated,
               "edit_ms_per_step": per_step * 1e3, "edit_encode_decode_ms": enc_dec * 1e3, "edit_ms": edit_lat * 1e3,
               "edit_img_s": 1 / edit_lat, "ratio_b1": edit_lat / lat1,
               "ratio_throughput": (args.batch / latb) / (1 / edit_lat)}
    label = (f"EXTRAPOLATED from {n_meas} measured steps to {args.edit_steps}" if extrapolated
             else f"measured, {args.edit_steps} steps")
    print(f"\n## bench_translate: arch={res['arch']} device={res['device']} dtype={res['dtype']} "
          f"resolution={res_px} threads={res['threads']}; medians of {rounds} interleaved rounds")
    print(f"translator: {how}; generator {res['generator_params_m']:.2f}M params; teacher UNet "
          f"{res['teacher_unet_params_m']:.2f}M params; task {task!r}\n")
    print("| method | latency per image (ms) | images/s |")
    print("|---|---:|---:|")
    print(f"| single pass, batch 1 | {res['single_pass_ms_b1']:.1f} | {res['single_pass_img_s_b1']:.1f} |")
    print(f"| single pass, batch {args.batch} | {res['single_pass_ms_batch'] / args.batch:.1f} | "
          f"{res['single_pass_img_s_batch']:.1f} |")
    print(f"| DDS editing, {args.edit_steps} steps, batch 1 ({label}) | {res['edit_ms']:.0f} | {res['edit_img_s']:.3f} |")
    print(f"\nediting: {res['edit_ms_per_step']:.2f} ms per step (one 4-way teacher call + SGD) + "
          f"{res['edit_encode_decode_ms']:.1f} ms encode/decode")
    print(f"ratio (edit latency / single-pass latency, batch 1) = {res['ratio_b1']:.1f}x; "
          f"throughput ratio (single pass at batch {args.batch} vs editing) = {res['ratio_throughput']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"edit_over_single_pass={res['ratio_b1']:.1f}")
    return 0


def bench_backends(args) -> int:
    """Eager vs torch.compile vs ONNX Runtime on one translator (see the module docstring)."""
    from ddstrans.translator import Translator

    quiet()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(names) - {"eager", "compile", "onnx"}
    if unknown:
        raise SystemExit(f"error: unknown backend(s) {sorted(unknown)}; choose from eager, compile, onnx")
    rounds = args.rounds or 5
    sync = make_sync(device)
    with tempfile.TemporaryDirectory(prefix="ddstrans-bench-backends-") as td:
        path = args.translator
        how = f"loaded from {path}"
        if path is None:
            from ddstrans.export import export_checkpoint
            from ddstrans.testing import make_shapes_checkpoint

            path = export_checkpoint(make_shapes_checkpoint(Path(td) / "c.ckpt"), Path(td) / "tr", onnx=True,
                                     examples=[])
            how = "random generator of the shapes translator's architecture, exported with --onnx"
        eager = Translator.from_pretrained(path, device=device)
        task = eager.tasks[0]
        r = eager.resolution
        g = torch.Generator().manual_seed(0)
        xs = {1: (torch.rand(1, 3, r, r, generator=g) * 2 - 1).to(device),
              args.batch: (torch.rand(args.batch, 3, r, r, generator=g) * 2 - 1).to(device)}
        runners, notes = {}, {}
        for name in names:
            t0 = time.perf_counter()
            try:
                if name == "eager":
                    tr = eager
                elif name == "compile":
                    tr = Translator.from_pretrained(path, device=device)
                    tr.generator = torch.compile(tr.generator, dynamic=False)
                else:
                    tr = Translator.from_pretrained(path, device=device, backend="onnx")
                with torch.inference_mode():
                    for x in xs.values():  # warm-up (compile happens here)
                        tr.translate_tensor(x, task)
                runners[name] = tr
                notes[name] = f"set-up + warm-up {time.perf_counter() - t0:.1f} s"
            except Exception as e:  # noqa: BLE001 - a backend the platform lacks is reported, not fatal
                notes[name] = f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        times = {(n, b): [] for n in runners for b in xs}
        with torch.inference_mode():
            ref = {b: eager.translate_tensor(x, task) for b, x in xs.items()}
            err = {n: max((tr.translate_tensor(x, task) - ref[b]).abs().max().item() for b, x in xs.items())
                   for n, tr in runners.items()}
            for _ in range(rounds):
                for n, tr in runners.items():  # interleaved: load drift hits every backend alike
                    for b, x in xs.items():
                        reps = 5 if b == 1 else 2
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            tr.translate_tensor(x, task)
                        sync()
                        times[(n, b)].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## bench_translate --backends: device={device} threads={torch.get_num_threads()} resolution={r} "
          f"task={task!r}; medians of {rounds} interleaved rounds")
    print(f"translator: {how}\n")
    print(f"| backend | ms / image, batch 1 | images/s, batch 1 | ms / image, batch {args.batch} | "
          f"images/s, batch {args.batch} | max abs diff vs eager | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for n in names:
        if n not in runners:
            print(f"| {n} | | | | | | {notes[n]} |")
            continue
        b1, bb = med[(n, 1)], med[(n, args.batch)]
        print(f"| {n} | {b1 * 1e3:.2f} | {1 / b1:.1f} | {bb / args.batch * 1e3:.2f} | {args.batch / bb:.1f} | "
              f"{err[n]:.1e} | {notes[n]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                               "batch": args.batch, "rounds": rounds, "translator": how,
                                               "seconds": {f"{n}@{b}": v for (n, b), v in med.items()},
                                               "max_abs_diff": err, "notes": notes}, indent=2))
    if "onnx" in runners and "eager" in runners:
        print(f"onnx_over_eager={med[('eager', args.batch)] / med[('onnx', args.batch)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
