"""``ddstrans export``: a training checkpoint -> a self-contained translator directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddstrans.cli.common import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a training checkpoint to a translator directory (safetensors + JSON)",
        description="Write generator weights (EMA by default), the task table, the teacher's VAE (and text "
        "encoder for text-conditioned generators), translator.json with file hashes, and a model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by ddstrans-train (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("out_dir", type=Path, nargs="?", default=None,
                   help="output directory (default: checkpoints/<run name>-step<N> under the current directory)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--reference-teacher", action="store_true",
                   help="reference the teacher directory by path instead of copying its VAE/text encoder")
    p.add_argument("--teacher", type=Path, default=None, help="teacher directory, if it moved since training")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust; by default it is read "
                   "with torch.load(weights_only=True))")
    p.add_argument("--onnx", action="store_true",
                   help="also write the generator (and VAE) as ONNX with dynamic batch under onnx/ (hashed like the "
                   "other files; run with Translator.from_pretrained(dir, backend='onnx'))")
    p.add_argument("--keep-adapters", action="store_true",
                   help="LoRA checkpoints: write only the adapters and conditioning tensors and reference the "
                   "teacher's UNet by directory, hub id and weight hash (loading needs that teacher; `ddstrans "
                   "translate --base` when it moved) instead of merging them into a self-contained copy")
    p.add_argument("--license", default=None,
                   help="license of the model card's front matter (default: the teacher card's, else 'other')")
    p.add_argument("--examples", type=Path, nargs="+", default=None, metavar="IMAGE",
                   help="example inputs stored in examples/ (the demo offers them; the card shows their "
                   "translations). Shapes-world runs render held-out scenes when not given")
    p.set_defaults(func=run)


def run(args) -> int:
    from ddstrans.export import ExportError, export_checkpoint, load_training_checkpoint

    out = args.out_dir
    if out is None:
        try:
            ckpt = load_training_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        except ExportError as e:
            raise CLIError(str(e)) from None
        name = (ckpt["ddstrans"].get("run_config") or {}).get("task_name") or "translator"
        out = Path("checkpoints") / f"{name}-step{ckpt.get('global_step', 0)}"
    from ddstrans.shapes.examples import examples_for_run

    examples = examples_for_run
    if args.examples:
        from ddstrans.images import ImageReadError, load_image

        try:
            examples = [load_image(f) for f in args.examples]
        except ImageReadError as e:
            raise CLIError(f"--examples: {e}") from None
    try:
        path = export_checkpoint(args.checkpoint, out, use_ema=not args.no_ema,
                                 copy_teacher=not args.reference_teacher, teacher_path=args.teacher,
                                 overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
                                 onnx=args.onnx, license=args.license, examples=examples,
                                 merge_adapters=not args.keep_adapters)
    except ExportError as e:
        raise CLIError(str(e)) from None
    print(f"exported translator to {path}")
    return 0
