"""``ddstrans edit``: zero-shot DDS (or SDS) editing of one or more images against a teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddstrans.cli.common import CLIError, pick_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="zero-shot edit of an image with DDS (per-image optimisation, no training)",
        description="Optimise the image's latent with Delta Denoising Score so that it matches TARGET while "
        "keeping what SOURCE describes. Defaults are the teacher's (the edit section of its ddstrans_settings.json), "
        "else the DDS reference settings (ddstrans.editing.EditConfig: SGD on 2000 x the surrogate loss; guidance, "
        "t range and weighting of ddstrans.guidance.Guidance).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", type=Path, help="input image (jpg, png, webp, bmp)")
    p.add_argument("--teacher", required=True, help="diffusers-format teacher directory or hub id")
    p.add_argument("--source", required=True, help="prompt that describes the input image")
    p.add_argument("--target", required=True, help="prompt that describes the wanted edit")
    p.add_argument("-o", "--output", type=Path, required=True, help="output PNG path")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the teacher's, else EditConfig's 200)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate on the latent (default: the teacher's, else EditConfig's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, both branches (default: the teacher's, else the DDS reference's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and timestep draws")
    p.add_argument("--size", type=int, default=None, help="working resolution (default: the teacher's native size)")
    p.add_argument("--sds", action="store_true", help="use SDS instead of DDS (for comparison)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="load the teacher in float16 (GPU only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ddstrans.editing import EditConfig, edit_images
    from ddstrans.images import load_image, pil_to_tensor, resize_center_crop, tensor_to_pil
    from ddstrans.teacher import Teacher

    if args.output.exists() and not args.overwrite:
        raise CLIError(f"{args.output} exists; pass --overwrite to replace it")
    if args.output.suffix.lower() != ".png":
        raise CLIError(f"output must be a .png file, got {args.output.name}")
    given = {"steps": args.steps, "lr": args.lr, "guidance": args.guidance}
    try:  # the flags alone first: a bad flag is reported before the teacher loads
        EditConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:  # the library names the parameter; the flag has the same name
        raise CLIError(f"--{e}") from None
    image = load_image(args.image)
    device = pick_device(args.device)
    dtype = torch.float16 if args.fp16 else None
    teacher = Teacher.from_pretrained(args.teacher, torch_dtype=dtype, device=device)
    cfg = teacher.settings.edit_config(seed=args.seed, method="sds" if args.sds else "dds", **given)
    size = args.size or teacher.image_size
    if size % teacher.image_multiple:
        raise CLIError(f"--size {size} must be a multiple of {teacher.image_multiple} for this teacher")
    x = pil_to_tensor(resize_center_crop(image, size))
    out = edit_images(teacher, x, args.source, args.target, cfg, progress=True)
    result = tensor_to_pil(out)[0].resize(image.size)
    from ddstrans.images import save_png

    try:
        save_png(result, args.output)  # temp name + rename: never a partial PNG under the output name
    except OSError as e:
        raise CLIError(f"could not write {args.output}: {e.strerror or e}") from None
    print(f"wrote {args.output} ({image.size[0]}x{image.size[1]}, {cfg.method.upper()}, {cfg.steps} steps)")
    return 0
