"""Shared fixtures: tiny random teachers written with ``save_pretrained`` and loaded through the real code."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Prompt-embedding cache in a temp dir, so tests never read or write the user's cache."""
    os.environ["DDSTRANS_CACHE"] = str(tmp_path_factory.mktemp("ddstrans_cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


def _make(tmp_path_factory, name, **kw):
    from ddstrans.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp(name) / "teacher", **kw)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """Epsilon-prediction SD-style teacher with a VAE (16x16 images, 4x8x8 latents)."""
    return _make(tmp_path_factory, "tiny_eps")


@pytest.fixture(scope="session")
def tiny_vpred_teacher_dir(tmp_path_factory):
    """The same architecture with a v-prediction scheduler (as Stable Diffusion 2.x)."""
    return _make(tmp_path_factory, "tiny_vpred", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_pixel_teacher_dir(tmp_path_factory):
    """A pixel-space teacher without VAE (latents = images in [-1, 1], 3x16x16)."""
    return _make(tmp_path_factory, "tiny_pixel", with_vae=False, sample_size=16)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny random SDXL, SD3, Flux-dev (guidance embedding) and Flux-schnell directories, written by the diffusers
    pipelines' own save_pretrained (16x16 images; latents 4x8x8 for SDXL, 16x8x8 otherwise)."""
    from ddstrans.testing import make_tiny_flux, make_tiny_sd3, make_tiny_sdxl

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": make_tiny_sdxl(root / "sdxl"),
        "sd3": make_tiny_sd3(root / "sd3"),
        "flux_dev": make_tiny_flux(root / "flux_dev", guidance_embeds=True),
        "flux_schnell": make_tiny_flux(root / "flux_schnell", guidance_embeds=False),
    }


@pytest.fixture(scope="session")
def teachers(family_dirs, tmp_path_factory):
    """The teachers of ``family_dirs``, loaded by Teacher.from_pretrained."""
    from ddstrans.teacher import Teacher

    cache = tmp_path_factory.mktemp("family_cache")
    return {k: Teacher.from_pretrained(d, cache_dir=cache) for k, d in family_dirs.items()}


@pytest.fixture
def tiny_teacher(tiny_teacher_dir, tmp_path):
    from ddstrans.teacher import Teacher

    return Teacher.from_pretrained(tiny_teacher_dir, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="session")
def load_script():
    """Import a file of ``scripts/`` (not a package) as a module, to test its functions: ``load_script("name")``."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def shapes_translator_dir(tmp_path_factory):
    """A random (non-identity) translator of the shapes translator's architecture, exported with ``--onnx``
    through the real export (32x32 pixels, the five shapes tasks, examples rendered)."""
    from ddstrans.export import export_checkpoint
    from ddstrans.shapes.examples import examples_for_run
    from ddstrans.testing import make_shapes_checkpoint

    tmp = tmp_path_factory.mktemp("shapes_translator")
    return export_checkpoint(make_shapes_checkpoint(tmp / "last.ckpt"), tmp / "translator", onnx=True,
                             examples=examples_for_run)


def pytest_collection_modifyitems(config, items):
    """``fullsize`` tests (minutes, several GB) run only when ``-m`` names them (e.g. ``-m fullsize``)."""
    if "fullsize" in (config.option.markexpr or ""):
        return
    keep = [i for i in items if i.get_closest_marker("fullsize") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("fullsize") is not None])
        items[:] = keep
