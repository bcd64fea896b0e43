"""ONNX export of a translator's networks and an onnxruntime backend for ``Translator``.

Why: a translator is one forward pass, so it can be deployed without PyTorch. ``write_onnx`` writes, into the
translator directory being built, ``onnx/generator.onnx`` (and, for latent translators, ``onnx/vae_encoder.onnx``
and ``onnx/vae_decoder.onnx``) with a dynamic batch axis and dynamic height/width (the generator is
fully convolutional; generators with position features are traced at the training size). The export then hashes
them with every other file, so ``translator.json`` lists them and loading verifies them.

``use_onnx(translator, root)`` swaps the generator and VAE of a loaded ``Translator`` for onnxruntime sessions with
the same call signatures, so every code path of ``Translator`` (PIL, tensors, latents) runs unchanged on either
backend. Prompt encoding (text-conditioned translators) stays on the PyTorch text encoder: it runs once per prompt
pair, not per image.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ONNX_DIR = "onnx"
OPSET = 17
GENERATOR_FILE = f"{ONNX_DIR}/generator.onnx"


class OnnxLoadError(RuntimeError):
    """An ONNX file that is missing, unlisted or fails its sha256 (``Translator`` reports it as a load error)."""

VAE_ENCODER_FILE = f"{ONNX_DIR}/vae_encoder.onnx"
VAE_DECODER_FILE = f"{ONNX_DIR}/vae_decoder.onnx"


class _GeneratorTaskId(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, latents, task_ids):
        return self.gen(latents, task_ids=task_ids)


class _GeneratorText(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, latents, src_emb, tgt_emb):
        return self.gen(latents, src_emb=src_emb, tgt_emb=tgt_emb)


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.mean


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def _export(module, args, path: Path, input_names, dynamic_axes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape asserts in diffusers blocks
        torch.onnx.export(module.eval(), args, str(path), input_names=list(input_names), output_names=["output"],
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)


def write_onnx(root: str | Path, generator, vae=None, *, resolution: int, downsample_factor: int,
               cross_attention_shape: tuple[int, int] | None = None) -> dict:
    """Export ``generator`` (and ``vae``) as ONNX under ``root/onnx``; returns the ``onnx`` entry of translator.json.

    ``cross_attention_shape``: (tokens, width) of a prompt embedding, for text-conditioned generators."""
    root = Path(root)
    gen = generator.float().eval()
    cfg = gen.config
    h = resolution // downsample_factor
    z = torch.randn(2, cfg.in_channels, h, h)
    spatial = not cfg.position_frequencies  # position features are computed from python ints: fixed size
    lat_axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    if cfg.conditioning == "task_id":
        args, names = (z, torch.zeros(2, dtype=torch.long)), ("latents", "task_ids")
        axes = {"latents": lat_axes, "task_ids": {0: "batch"}}
        module = _GeneratorTaskId(gen)
    else:
        if cross_attention_shape is None:
            raise ValueError("cross_attention_shape is needed for a text-conditioned generator")
        emb = torch.randn(2, *cross_attention_shape)
        args, names = (z, emb, emb.clone()), ("latents", "src_emb", "tgt_emb")
        axes = {"latents": lat_axes, "src_emb": {0: "batch"}, "tgt_emb": {0: "batch"}}
        module = _GeneratorText(gen)
    with torch.no_grad():
        _export(module, args, root / GENERATOR_FILE, names, {**axes, "output": lat_axes})
    entry = {"opset": OPSET, "generator": GENERATOR_FILE, "inputs": list(names), "dynamic_size": spatial}
    if vae is not None:
        vae = vae.float().eval()
        img_axes = {0: "batch", 2: "height", 3: "width"}
        with torch.no_grad():
            _export(_VaeEncoder(vae), (torch.randn(2, 3, resolution, resolution),), root / VAE_ENCODER_FILE,
                    ("images",), {"images": img_axes, "output": img_axes})
            _export(_VaeDecoder(vae), (torch.randn(2, vae.config.latent_channels, h, h),), root / VAE_DECODER_FILE,
                    ("latents",), {"latents": img_axes, "output": img_axes})
        entry.update(vae_encoder=VAE_ENCODER_FILE, vae_decoder=VAE_DECODER_FILE)
    return entry


# ---------------------------------------------------------------------- runtime
def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(root: Path, rel: str, files: dict[str, str], device: torch.device):
    """An onnxruntime session of ``root/rel`` built from bytes whose sha256 matched translator.json (no second
    read of the path after the check)."""
    import onnxruntime as ort

    data = (root / rel).read_bytes() if (root / rel).is_file() else None
    if data is None:
        raise OnnxLoadError(f"{root}: {rel} is missing (export with `ddstrans export --onnx`)")
    if rel not in files or hashlib.sha256(data).hexdigest() != files[rel]:
        raise OnnxLoadError(f"{root}: {rel} is not listed in translator.json or does not match its sha256; "
                                  "refusing to load")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()  # the same CPU share as the PyTorch backend
    return ort.InferenceSession(data, sess_options=opts, providers=_providers(device))


def _np(x: torch.Tensor | None, dtype=np.float32):
    return None if x is None else x.detach().to("cpu").numpy().astype(dtype, copy=False)


class _FrozenModuleAPI:
    """The ``nn.Module`` calls ``Translator`` makes on its parts (``to``, ``eval``, ``requires_grad_``): an
    onnxruntime session is fixed to its device and has no parameters, so each is a no-op."""

    def to(self, device=None, **_):
        return self

    def eval(self):
        return self

    def requires_grad_(self, _=False):
        return self


class OrtGenerator(_FrozenModuleAPI):
    """The generator's call signature, ``(z, task_ids=, src_emb=, tgt_emb=) -> z_out``, on onnxruntime."""

    def __init__(self, session, config, device: torch.device):
        self.session, self.config, self._device = session, config, torch.device(device)
        self.input_names = [i.name for i in session.get_inputs()]

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, z, task_ids=None, src_emb=None, tgt_emb=None):
        feeds = {"latents": _np(z), "task_ids": _np(task_ids, np.int64), "src_emb": _np(src_emb),
                 "tgt_emb": _np(tgt_emb)}
        missing = [n for n in self.input_names if feeds.get(n) is None]
        if missing:
            raise ValueError(f"the ONNX generator needs {', '.join(missing)}")
        out = self.session.run(None, {n: feeds[n] for n in self.input_names})[0]
        return torch.from_numpy(out).to(self._device)



class OrtVAE(_FrozenModuleAPI):
    """``encode(x).latent_dist.mean`` and ``decode(z).sample`` (diffusers' AutoencoderKL API) on onnxruntime."""

    dtype = torch.float32

    def __init__(self, encoder, decoder, config, device: torch.device):
        self.encoder, self.decoder, self.config, self._device = encoder, decoder, config, torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def encode(self, x):
        mean = torch.from_numpy(self.encoder.run(None, {"images": _np(x)})[0]).to(self._device)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))

    def decode(self, z):
        return SimpleNamespace(sample=torch.from_numpy(self.decoder.run(None, {"latents": _np(z)})[0]).to(self._device))



def use_onnx(translator, root: str | Path, device: str | torch.device = "cpu"):
    """Replace ``translator``'s generator (and VAE) by onnxruntime sessions of ``root/onnx``; returns it."""
    root, device = Path(root), torch.device(device)
    entry = translator.info.get("onnx")
    if not entry:
        raise OnnxLoadError(f"{root}: this translator has no ONNX files (export it with `ddstrans export --onnx`)")
    files = translator.info.get("files", {})
    gen = translator.generator
    translator.generator = OrtGenerator(_session(root, entry["generator"], files, device), gen.config, device)
    if translator.vae is not None:
        if "vae_encoder" not in entry:
            raise OnnxLoadError(f"{root}: the ONNX export lacks the VAE of this latent translator")
        translator.vae = OrtVAE(_session(root, entry["vae_encoder"], files, device),
                                _session(root, entry["vae_decoder"], files, device), translator.vae.config, device)
    translator.backend = "onnx"
    return translator
