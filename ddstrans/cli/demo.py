"""``ddstrans demo``: serve a translator as a web page (Gradio; ``pip install "ddstrans[demo]"``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="serve a web page to try a translator (upload, before/after, batch -> zip)",
        description="Serve TRANSLATOR (a directory from `ddstrans export`, or a hub id org/name) as a Gradio page: "
        "upload, paste or pick an example image, choose a task (or type prompts for a text-conditioned "
        "translator), see input and output side by side; a batch tab turns many images into a zip. "
        "Listens on localhost unless --host says otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("translator", help="exported translator directory or hub repository id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="run the generator with PyTorch or with onnxruntime (needs `ddstrans export --onnx`)")
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="largest image accepted (width x height)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise CLIError('the demo needs gradio: pip install "ddstrans[demo]"')
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.max_pixels < 1:
        raise CLIError("--max-pixels must be >= 1")
    from ddstrans.demo import launch
    from ddstrans.translator import Translator, TranslatorLoadError

    if not Path(args.translator).exists() and "/" not in args.translator:
        raise CLIError(f"{args.translator}: no such translator directory")
    try:
        tr = Translator.from_pretrained(args.translator, device=pick_device(args.device), backend=args.backend)
    except TranslatorLoadError as e:
        raise CLIError(str(e)) from None
    print(f"starting the demo of {args.translator} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    try:
        launch(tr, host=args.host, port=args.port, max_pixels=args.max_pixels)
    except OSError as e:  # port taken, address not local, ...
        raise CLIError(f"cannot serve on {args.host}:{args.port} ({str(e).strip().splitlines()[0]}); "
                       "choose another --port") from None
    return 0
