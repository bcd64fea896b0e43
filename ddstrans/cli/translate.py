"""``ddstrans translate``: run an exported translator on image files (one forward pass per batch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate images with an exported translator (single forward pass)",
        description="Translate each input image with TRANSLATOR_DIR (see `ddstrans export`) and write "
        "OUTDIR/<input name>.png at the input's size. Inputs are files, directories (their image files), glob "
        "patterns (quoted: 'photos/**/*.jpg') or - (newline-separated paths on stdin). The aspect ratio is kept "
        "(scaled and padded to the training resolution, then back); --crop, --resize and --native-size change that. "
        "Unreadable inputs are reported and skipped; the exit code is 1 if any input failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("translator", type=Path, help="exported translator directory")
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files, directories, glob patterns, or - (stdin)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("--task", default=None, help="task name (see translator.json); or --source/--target")
    p.add_argument("--source", default=None, help="source prompt (text-conditioned translators)")
    p.add_argument("--target", default=None, help="target prompt (text-conditioned translators)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="run in float16 (GPU only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--resize", dest="fit", action="store_const", const="resize",
                     help="stretch every image to the training resolution and back (aspect ratio not kept)")
    fit.add_argument("--crop", dest="fit", action="store_const", const="crop",
                     help="translate the center square only (output: that square at the input's scale)")
    fit.add_argument("--native-size", dest="fit", action="store_const", const="native",
                     help="run at each input's own size, rounded to the generator's size multiple "
                     "(fully convolutional generators)")
    p.set_defaults(func=run, fit="pad")


def _output_names(files: list[Path], outdir: Path) -> list[Path]:
    seen: dict[str, int] = {}
    outs = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        outs.append(outdir / (f"{f.stem}.png" if n == 0 else f"{f.stem}_{n}.png"))
    return outs


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ddstrans.images import ImageReadError, load_image
    from ddstrans.translator import Translator, TranslatorLoadError

    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    if args.task is None and (args.source is None or args.target is None):
        raise CLIError("give --task NAME, or --source and --target for a text-conditioned translator")
    from ddstrans.inputs import expand_inputs

    files = expand_inputs(args.inputs)
    if not files:
        raise CLIError("no input images found")
    outs = _output_names(files, args.output)
    existing = [o for o in outs if o.exists()]
    if existing and not args.overwrite:
        raise CLIError(f"{existing[0]} exists ({len(existing)} output(s) would be replaced); pass --overwrite")
    device = pick_device(args.device)
    try:
        tr = Translator.from_pretrained(args.translator, device=device,
                                        dtype=torch.float16 if args.fp16 else None)
    except TranslatorLoadError as e:
        raise CLIError(str(e)) from None
    if args.task is not None and args.task not in tr.tasks:
        raise CLIError(f"unknown task {args.task!r}; this translator has: {', '.join(tr.tasks)}")
    args.output.mkdir(parents=True, exist_ok=True)
    failed, written = [], 0
    bar = tqdm(total=len(files), unit="img", disable=args.no_progress, file=sys.stderr)
    for i in range(0, len(files), args.batch_size):
        chunk = list(zip(files[i:i + args.batch_size], outs[i:i + args.batch_size]))
        images, targets = [], []
        for f, o in chunk:
            try:
                images.append(load_image(f))
                targets.append(o)
            except ImageReadError as e:
                failed.append(f)
                tqdm.write(f"skipped {e}", file=sys.stderr)
        if images:
            results = tr(images, task=args.task, source=args.source, target=args.target, fit=args.fit)
            for im, o in zip(results, targets):
                im.save(o)
                written += 1
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {written} image(s) to {args.output}" + (f"; {len(failed)} input(s) failed" if failed else ""))
    return 1 if failed else 0
