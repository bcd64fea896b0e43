"""A Gradio web page for an exported translator: ``ddstrans demo TRANSLATOR`` (needs ``pip install "ddstrans[demo]"``).

Why this shape: people judge an image translator by trying it on their own pictures, side by side with the input.
The page offers an upload (or paste, or one of the translator's bundled ``examples/``), the translator's tasks (and,
for text-conditioned translators, free source/target prompts), a before/after slider, a batch tab (images in, a
zip out), and the time per image and the device of each run.

The work is done by plain functions (``translate_one``, ``translate_many``) that raise ``DemoInputError`` with a
sentence for the person at the page; the Gradio layer turns it into a visible ``gr.Error`` message. Any other
failure is logged on the server with its traceback and shown as a one-line error: the page never shows a stack
trace, and the server keeps serving. Importing ``ddstrans`` never imports Gradio (only ``build_demo`` does).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger("ddstrans.demo")

DEFAULT_MAX_PIXELS = 16_000_000  # 4000 x 4000: larger uploads are refused with a message
CUSTOM = "custom prompts"
# small images (the shapes world is 32x32) are drawn large and unsmoothed, so their pixels can be judged
CSS = """
#input-image img, #output-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#before-after img, #batch-gallery img { image-rendering: pixelated; }
"""
FIT_CHOICES = ("pad", "crop", "resize", "native")


class DemoInputError(ValueError):
    """Input the page cannot translate; the message is shown to the person as is."""


@dataclass
class Result:
    images: list[Image.Image]
    seconds: float
    label: str  # what was asked: a task name or "source -> target"

    def status(self, device: str) -> str:
        n = len(self.images)
        per = self.seconds / max(n, 1) * 1000
        return f"**{self.label}** · {n} image{'s' if n != 1 else ''} · {per:.1f} ms / image · {device}"


def device_label(translator) -> str:
    backend = "ONNX Runtime" if getattr(translator, "backend", "torch") == "onnx" else "PyTorch"
    return f"{translator.device} ({backend})"


def _condition(translator, task: str | None, source: str | None, target: str | None, route: bool = False) -> dict:
    """The keyword arguments of ``Translator.__call__`` for the page's choice, or a ``DemoInputError``.
    ``route`` applies to a prompt pair only (a task is one trained pass already)."""
    if task and task != CUSTOM:
        if task not in translator.tasks:
            raise DemoInputError(f"Unknown task {task!r}; this translator has: {', '.join(translator.tasks)}.")
        return {"task": task}
    if translator.conditioning != "text":
        raise DemoInputError(f"Choose a task ({', '.join(translator.tasks)}).")
    source, target = (source or "").strip(), (target or "").strip()
    if not source or not target:
        raise DemoInputError("Type both a source prompt (what the image shows) and a target prompt (what it "
                             "should show).")
    return {"source": source, "target": target, "route": bool(route)}


def _label(translator, kw: dict) -> str:
    """What the status line says was asked; a routed pair names its passes, so the person sees which trained edits
    ran."""
    if "task" in kw:
        return kw["task"]
    label = f"{kw['source']} → {kw['target']}"
    if kw.get("route"):
        steps = translator.route(kw["source"], kw["target"])
        passes = " → ".join(s.task or "the pair itself" for s in steps) or "none (source and target are the same)"
        label += f" · routed, {len(steps)} pass{'es' if len(steps) != 1 else ''}: {passes}"
    return label


def _check_image(im, max_pixels: int, name: str = "The image") -> Image.Image:
    from ddstrans.images import to_rgb

    if im is None:
        raise DemoInputError("Upload, paste or pick an image first.")
    if not isinstance(im, Image.Image):
        raise DemoInputError(f"{name} is not an image.")
    w, h = im.size
    if w * h > max_pixels:
        raise DemoInputError(f"{name} is {w} x {h} pixels; this page takes at most {max_pixels:,} pixels. "
                             "Downscale it first.")
    if min(w, h) < 1:
        raise DemoInputError(f"{name} is empty.")
    return to_rgb(im)


def translate_one(translator, image, task=None, source=None, target=None, fit: str = "pad",
                  max_pixels: int = DEFAULT_MAX_PIXELS, route: bool = False) -> Result:
    """One image through the translator, with the page's checks."""
    return translate_many(translator, [image], task, source, target, fit, max_pixels, route=route)


def translate_many(translator, images: Sequence, task=None, source=None, target=None, fit: str = "pad",
                   max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 8, route: bool = False) -> Result:
    """Images through the translator, with the page's checks. ``route``: a prompt pair runs as the chain of trained
    edits ``Translator.route`` plans (``Translator.__call__(route=True)``)."""
    if fit not in FIT_CHOICES:
        raise DemoInputError(f"Fit must be one of {', '.join(FIT_CHOICES)}.")
    kw = _condition(translator, task, source, target, route)
    ims = [_check_image(im, max_pixels) for im in images]
    if not ims:
        raise DemoInputError("Upload at least one image.")
    label = _label(translator, kw)
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(ims), batch_size):
        out += translator(ims[i:i + batch_size], fit=fit, **kw)
    return Result(out, time.perf_counter() - t0, label)


def load_uploads(paths: Sequence[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS):
    """Uploaded files -> (names, images, skipped messages). Files that are not images, or too large, are skipped."""
    from ddstrans.images import ImageReadError, load_image

    names, images, skipped = [], [], []
    for p in paths or []:
        p = Path(p)
        try:
            with Image.open(p) as probe:  # the size from the header, before decoding all pixels
                w, h = probe.size
            if w * h > max_pixels:
                skipped.append(f"{p.name}: {w} x {h} pixels (at most {max_pixels:,})")
                continue
            images.append(load_image(p))
            names.append(p.stem)
        except (ImageReadError, OSError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e).split(": ", 1)[-1] if isinstance(e, ImageReadError) else "not a readable image"
            skipped.append(f"{p.name}: {reason}")
    return names, images, skipped


def write_zip(names: Sequence[str], images: Sequence[Image.Image], directory: str | Path) -> Path:
    """``translated.zip`` of PNGs named after the inputs (made unique), written then renamed into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / "translated.zip", directory / ".translated.zip.tmp"
    seen: dict[str, int] = {}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, im in zip(names, images):
            k = seen.get(name, 0)
            seen[name] = k + 1
            with zf.open(f"{name}.png" if k == 0 else f"{name}_{k}.png", "w") as f:
                im.save(f, format="PNG")
    os.replace(tmp, path)
    return path


def example_paths(translator) -> list[Path]:
    """The translator's bundled example inputs (``examples/example_*.png``, listed in translator.json)."""
    root = getattr(translator, "path", None)
    if root is None:
        return []
    listed = translator.info.get("files", {})
    return [root / rel for rel in sorted(listed) if rel.startswith("examples/example_") and (root / rel).is_file()]


# ---------------------------------------------------------------------- the page
def build_demo(translator, *, max_pixels: int = DEFAULT_MAX_PIXELS, title: str | None = None):
    """The Gradio ``Blocks`` of the page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    device = device_label(translator)
    text = translator.conditioning == "text"
    tasks = list(translator.tasks) + ([CUSTOM] if text else [])
    name = title or (Path(translator.path).name if getattr(translator, "path", None) else "translator")
    teacher = translator.info.get("teacher", {}).get("source") or "unknown teacher"

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except DemoInputError as e:
                raise gr.Error(str(e), title="Cannot translate", print_exception=False) from None
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the page shows one line; the server log keeps the traceback
                log.exception("translation failed")
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise gr.Error(f"Translation failed: {type(e).__name__}{': ' + first if first else ''}",
                               title="Error") from None
        return run

    def on_translate(image, task, source, target, fit, route=False):
        res = translate_one(translator, image, task, source, target, fit, max_pixels, route=route)
        src = _check_image(image, max_pixels)
        return (src, res.images[0]), res.images[0], res.status(device)

    def on_batch(files, task, source, target, fit, route=False):
        paths = [getattr(f, "name", f) for f in (files or [])]
        if not paths:
            raise DemoInputError("Upload one or more image files.")
        names, images, skipped = load_uploads(paths, max_pixels)
        for msg in skipped:
            gr.Warning(f"Skipped {msg}")
        if not images:
            raise DemoInputError("None of the uploaded files is an image this page can read.")
        res = translate_many(translator, images, task, source, target, fit, max_pixels, route=route)
        zpath = write_zip(names, res.images, tempfile.mkdtemp(prefix="ddstrans-demo-"))
        status = res.status(device) + (f" · skipped {len(skipped)}" if skipped else "")
        return str(zpath), res.images, status

    with gr.Blocks(title=f"ddstrans · {name}") as demo:
        gr.Markdown(f"## {name}\nSingle-pass image translation (ddstrans, DDS against `{teacher}`): "
                    f"{translator.conditioning} conditioning, {translator.resolution} px, running on **{device}**.")
        with gr.Row():
            task = gr.Radio(tasks, value=tasks[0], label="Task", elem_id="task")
            fit = gr.Radio(list(FIT_CHOICES), value="pad", label="Fit (aspect ratio)", elem_id="fit",
                           info="pad: keep the whole image; crop: the center square; resize: stretch; "
                           "native: run at the image's own size")
        with gr.Row(visible=text):
            source = gr.Textbox(label="Source prompt (what the image shows)", elem_id="source")
            target = gr.Textbox(label="Target prompt (what it should show)", elem_id="target")
            route = gr.Checkbox(value=False, label="Route through trained edits", elem_id="route",
                                info="for a pair training never saw: one pass per trained edit on the way "
                                "(e.g. red → blue, then blue → yellow); the status line names them")
        with gr.Tab("Image"):
            with gr.Row():
                inp = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"], label="Input",
                               elem_id="input-image", format="png", height=320)
                out = gr.Image(type="pil", label="Output", elem_id="output-image", format="png", interactive=False,
                               height=320)
            go = gr.Button("Translate", variant="primary", elem_id="translate-btn")
            status = gr.Markdown(elem_id="status")
            slider = gr.ImageSlider(type="pil", label="Before / after", elem_id="before-after", format="png",
                                    interactive=False, max_height=360)
            examples = example_paths(translator)
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[inp], label="Examples", cache_examples=False)
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", label="Images", elem_id="batch-input")
            go_many = gr.Button("Translate all", variant="primary", elem_id="batch-btn")
            batch_status = gr.Markdown(elem_id="batch-status")
            zip_out = gr.File(label="Translated images (zip)", elem_id="batch-zip", interactive=False)
            gallery = gr.Gallery(label="Outputs", elem_id="batch-gallery", format="png", columns=6, height=260,
                                 object_fit="contain")
        go.click(guarded(on_translate), [inp, task, source, target, fit, route], [slider, out, status], api_name="translate")
        go_many.click(guarded(on_batch), [files, task, source, target, fit, route], [zip_out, gallery, batch_status],
                      api_name="translate_batch")
    return demo


def launch(translator, *, host: str = "127.0.0.1", port: int = 7860, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_file_size: str = "50mb", block: bool = True):
    """Serve the page (localhost by default; queue of one run at a time so runs do not share the model)."""
    demo = build_demo(translator, max_pixels=max_pixels)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False, ssr_mode=False,
                max_file_size=max_file_size, css=CSS, prevent_thread_lock=not block)
    return demo
