"""``ddstrans translate``: run an exported translator on image files (one forward pass per batch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate images with an exported translator (single forward pass)",
        description="Translate each input image with TRANSLATOR_DIR (see `ddstrans export`) and write "
        "OUTDIR/<input name>.png at the input's size (the input tree mirrored below OUTDIR when names repeat). "
        "Inputs are files, directories (their image files), glob patterns (quoted: 'photos/**/*.jpg') or - "
        "(newline-separated paths on stdin); a file given twice is translated once. The aspect ratio is kept "
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
    p.add_argument("--route", action="store_true",
                   help="reach --source/--target through the translator's trained caption rewrites, one forward pass "
                   "each (a pair training never asked for: two attributes at once, a source and target never "
                   "together); a pair no chain of them reaches takes one pass")
    p.add_argument("--base", type=Path, default=None,
                   help="teacher directory of a translator exported with --keep-adapters (default: the one it records)")
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
    """``OUTDIR/<input stem>.png`` when those names are unique; otherwise the input tree is mirrored below
    ``OUTDIR`` (paths relative to the inputs' common directory), so no output can take another input's name.
    Inputs that still collide (``a.jpg`` and ``a.png`` side by side) keep their suffix: ``a.jpg.png``."""
    def unique(names: list[str]) -> bool:
        return len(set(names)) == len(names)

    flat = [f"{f.stem}.png" for f in files]
    if unique(flat):
        return [outdir / n for n in flat]
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    rel = [r.relative_to(root) for r in resolved]
    names = [r.with_suffix(".png").as_posix() for r in rel]
    clash = {n for n in names if names.count(n) > 1}
    names = [(r.parent / f"{r.name}.png").as_posix() if n in clash else n for r, n in zip(rel, names)]
    if not unique(names):
        dup = next(n for n in names if names.count(n) > 1)
        a, b = [str(f) for f, n in zip(files, names) if n == dup][:2]
        raise CLIError(f"inputs {a} and {b} would both be written to {outdir / dup}; rename one")
    return [outdir / n for n in names]


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ddstrans.images import ImageReadError, load_image, save_png
    from ddstrans.io_safety import is_no_space
    from ddstrans.translator import Translator, TranslatorLoadError

    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    if args.task is None and (args.source is None or args.target is None):
        raise CLIError("give --task NAME, or --source and --target for a text-conditioned translator")
    if args.route and args.task is not None:
        raise CLIError("--route takes --source and --target, not --task")
    from ddstrans.inputs import expand_inputs

    files = list({f.resolve(): f for f in expand_inputs(args.inputs)}.values())  # a file given twice: translated once
    if not files:
        raise CLIError("no input images found")
    outs = _output_names(files, args.output)
    existing = [o for o in outs if o.exists()]
    if existing and not args.overwrite:
        raise CLIError(f"{existing[0]} exists ({len(existing)} output(s) would be replaced); pass --overwrite")
    device = pick_device(args.device)
    try:
        tr = Translator.from_pretrained(args.translator, device=device,
                                        dtype=torch.float16 if args.fp16 else None, base=args.base)
    except TranslatorLoadError as e:
        raise CLIError(str(e)) from None
    if args.task is not None and args.task not in tr.tasks:
        raise CLIError(f"unknown task {args.task!r}; this translator has: {', '.join(tr.tasks)}")
    if args.route:
        if tr.conditioning != "text":
            raise CLIError("--route needs a text-conditioned translator (this one takes --task)")
        steps = tr.route(args.source, args.target)
        print(f"route: {len(steps)} pass(es): " + " | ".join(f"{s.task or 'the pair itself'}: {s.source!r} -> "
                                                              f"{s.target!r}" for s in steps), file=sys.stderr)
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
            results = tr(images, task=args.task, source=args.source, target=args.target, fit=args.fit,
                         route=args.route)
            for im, o in zip(results, targets):
                try:
                    save_png(im, o)
                except OSError as e:
                    if is_no_space(e):
                        bar.close()
                        raise CLIError(f"no space left on {o.parent} writing {o.name}; {written} image(s) were "
                                       "written, none partially") from None
                    failed.append(o)
                    tqdm.write(f"could not write {o}: {e}", file=sys.stderr)
                    continue
                written += 1
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {written} image(s) to {args.output}" + (f"; {len(failed)} input(s) failed" if failed else ""))
    return 1 if failed else 0
