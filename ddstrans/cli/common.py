"""Helpers shared by the argparse subcommands: quiet library logs, one-line errors, devices."""

from __future__ import annotations

import logging
import os
import warnings


class CLIError(Exception):
    """An error reported to the user as one line, without a stack trace."""


# The library names parameters in its errors; on the command line they are flags.
PARAMETER_FLAGS = {
    "trust_checkpoint=True": "--trust-checkpoint",
    "use_ema=False": "--no-ema",
    "overwrite=True": "--overwrite",
    "give teacher_path,": "pass --teacher PATH,",
    "teacher (latents) needs resolution": "--latents needs --resolution",
    "prompts must hold at least one prompt": "give at least one --prompt",
    "merge_adapters=False": "--keep-adapters",
    "onnx=True": "--onnx",
    "give base,": "pass --base DIR,",
    "base='": "--base '",
}


def as_flags(message: str) -> str:
    """A library error message in the CLI's words: parameter names become the flags that set them."""
    for parameter, flag in PARAMETER_FLAGS.items():
        message = message.replace(parameter, flag)
    return message


def quiet_libraries() -> None:
    """Silence third-party chatter (progress bars of weight loading, deprecations) in CLI output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def pick_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
