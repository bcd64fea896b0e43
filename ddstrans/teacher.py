"""The frozen text-to-image diffusion teacher.

Loads a diffusers-format directory (as ``StableDiffusionPipeline.save_pretrained`` writes it: ``unet/``,
``scheduler/``, ``text_encoder/``, ``tokenizer/``, optional ``vae/``) or a hub id through the same code.
The teacher is a plain object, not an ``nn.Module``: a LightningModule that holds it keeps it out of its
``state_dict``, its checkpoints and DDP's gradient synchronisation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ddstrans.guidance import Guidance
from ddstrans.scores import classifier_free_guidance, eps_from_sample, eps_from_v

REQUIRED_COMPONENTS = ("unet", "scheduler", "text_encoder", "tokenizer")


class TeacherLoadError(RuntimeError):
    """A teacher directory or hub id that cannot be loaded (message is one line, says what to fix)."""


def default_cache_dir() -> Path:
    root = os.environ.get("DDSTRANS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddstrans"
    )
    return Path(root) / "prompt_embeddings"


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _resolve(path_or_hub_id: str | os.PathLike) -> tuple[Path, str]:
    """A local directory holding the components, and a stable identity string for caching."""
    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve(), str(local.resolve())
    if local.exists():
        raise TeacherLoadError(f"teacher path {name!r} is a file; expected a diffusers-format directory")
    if not _looks_like_hub_id(name):
        raise TeacherLoadError(f"teacher directory {name!r} does not exist (and it is not a hub id like 'org/model')")
    try:
        from huggingface_hub import snapshot_download

        allow = [f"{c}/*" for c in (*REQUIRED_COMPONENTS, "vae")] + ["model_index.json"]
        return Path(snapshot_download(name, allow_patterns=allow)), f"hub:{name}"
    except Exception as e:  # noqa: BLE001 - network/auth errors come in many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TeacherLoadError(f"could not fetch teacher {name!r} from the hub: {msg}") from None


def _fingerprint(root: Path, identity: str) -> str:
    """Cache key of the text encoding: identity + tokenizer/text-encoder configs and weight sizes and mtimes, so
    a teacher retrained in place (same architecture, same path) never reads the old embeddings."""
    h = hashlib.sha256(identity.encode())
    for sub in ("tokenizer", "text_encoder"):
        d = root / sub
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            h.update(f.name.encode())
            if f.suffix in (".json", ".txt"):
                h.update(f.read_bytes())
            else:  # weights: size and modification time (hashing GBs of weights at every load is too slow)
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Stable Diffusion prompt encoding: pad to the tokenizer's max length, truncate, last hidden state."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def ddim_scheduler(scheduler, num_inference_steps: int, device=None, **overrides):
    """A DDIM scheduler with the training ``scheduler``'s config (``overrides``, e.g. ``timestep_spacing``, replace
    entries), set to ``num_inference_steps``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config, **overrides)
    sched.set_timesteps(num_inference_steps, device=device)
    return sched


@torch.no_grad()
def ddim_cfg_loop(unet, sched, z: torch.Tensor, emb: torch.Tensor, uncond: torch.Tensor,
                  guidance_scale: float | Callable[[int], float], *, eta: float | Callable[[int], float] = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``sched``'s timesteps from latents ``z`` (float32) with classifier-free guidance (one batched UNet call
    per step: unconditional and conditional); returns the final latents. ``guidance_scale`` may be a function of the
    timestep (guidance schedules). Shared by :meth:`Teacher.sample` and the shapes teacher's training probe, which
    samples with weights still in training. ``eta`` > 0 adds fresh noise at every step (DDIM's eta; 1 is DDPM's
    posterior variance), drawn from ``generator``: stochastic samplers can correct an earlier step's error; it may be
    a function of the timestep too (noise only where the layout is still open, say)."""
    for t in sched.timesteps:
        scale = guidance_scale(int(t)) if callable(guidance_scale) else guidance_scale
        step_eta = eta(int(t)) if callable(eta) else eta
        tt = t.reshape(1).expand(len(z)).to(z.device)
        eps = unet(torch.cat([z, z]).to(unet.dtype), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([uncond, emb])).sample.float()
        eps_u, eps_c = eps.chunk(2)
        # eta 0: DDIMScheduler.step draws no noise, so the generator is left untouched
        z = sched.step(classifier_free_guidance(eps_u, eps_c, scale), t, z, eta=step_eta, generator=generator).prev_sample
    return z


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor, scale: float, *, sample: bool = False, generator=None) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (float32); ``vae=None`` (pixel space) returns the images."""
    if vae is None:
        return images.float()
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return (dist.sample(generator) if sample else dist.mean).float() * scale


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32, clamped); ``vae=None`` returns the latents clamped."""
    if vae is None:
        return latents.float().clamp(-1, 1)
    return vae.decode((latents / scale).to(device=vae.device, dtype=vae.dtype)).sample.float().clamp(-1, 1)


class Teacher:
    """A frozen diffusion model that gives noise predictions, prompt embeddings and (de)coding.

    Attributes: ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``, ``vae`` (or None for pixel-space
    teachers), ``alphas_cumprod`` (float32), ``prediction_type``, ``latent_scale``, ``downsample_factor``.
    """

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, *, identity="teacher", cache_dir=None):
        self.unet, self.scheduler, self.text_encoder, self.tokenizer, self.vae = (
            unet,
            scheduler,
            text_encoder,
            tokenizer,
            vae,
        )
        for m in (unet, text_encoder, vae):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        self.identity = identity
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise TeacherLoadError(f"unsupported prediction_type {self.prediction_type!r} in scheduler config")
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(unet.device)
        self.latent_scale = float(vae.config.get("scaling_factor", 1.0)) if vae is not None else 1.0
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.latent_channels = unet.config.in_channels
        self._memory_cache: dict[str, torch.Tensor] = {}
        self._uncond: torch.Tensor | None = None
        self.text_encoder_calls = 0  # how often the text encoder actually ran (cache diagnostics)
        self.channels_last = False  # set_channels_last()
        self.compiled = False  # compile()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        variant: str | None = None,
    ) -> Teacher:
        """Load and freeze a teacher. ``torch_dtype`` (e.g. ``torch.float16`` on GPU) applies to all weights;
        ``variant="fp16"`` picks ``*.fp16.safetensors`` files where a checkpoint ships them."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        root, identity = _resolve(path_or_hub_id)
        missing = [c for c in REQUIRED_COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise TeacherLoadError(
                f"teacher directory {str(root)!r} lacks component(s) {', '.join(missing)}; "
                f"expected subfolders {', '.join(REQUIRED_COMPONENTS)} (and optional vae)"
            )
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        if variant is not None:
            dtype_kw["variant"] = variant

        def load(what, fn):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TeacherLoadError(f"cannot load teacher component {what!r} from {str(root / what)!r}: {first}") from None

        unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(root, subfolder="unet", **dtype_kw))
        scheduler = load("scheduler", lambda: DDPMScheduler.from_pretrained(root, subfolder="scheduler"))
        text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **dtype_kw))
        tokenizer = load("tokenizer", lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
        vae = None
        if (root / "vae").is_dir():
            vae = load("vae", lambda: AutoencoderKL.from_pretrained(root, subfolder="vae", **dtype_kw))
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        teacher = cls(unet, scheduler, text_encoder, tokenizer, vae, identity=_fingerprint(root, identity), cache_dir=cache)
        teacher.source = str(path_or_hub_id)
        teacher.root = root
        if device is not None:
            teacher.to(device)
        return teacher

    def to(self, device=None, dtype=None) -> Teacher:
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype)
        if device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
            self._memory_cache = {k: v.to(device) for k, v in self._memory_cache.items()}
            self._uncond = None
        return self

    def set_channels_last(self, enabled: bool = True) -> Teacher:
        """Keep the UNet's conv weights in channels_last (NHWC) memory format (and feed it NHWC latents).

        Opt-in: on CPU with the shapes teacher the fastest calls were ~11% faster, the median ~2% (noisy; see
        docs/performance.md); GPUs to be measured. ``to()`` preserves the format afterwards."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        self.channels_last = bool(enabled)
        return self

    def compile(self, **kwargs) -> Teacher:
        """``torch.compile`` the UNet in place (``nn.Module.compile``: parameter names unchanged). Opt-in: the
        first call compiles (seconds to minutes); worth it for long GPU runs. ``kwargs`` go to ``torch.compile``."""
        self.unet.compile(**kwargs)
        self.compiled = True
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # ------------------------------------------------------------------ prompts
    def _disk_path(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(prompt.encode()).hexdigest()[:32]
        return self.cache_dir / self.identity / f"{key}.safetensors"

    def _load_cached(self, prompt: str) -> torch.Tensor | None:
        if prompt in self._memory_cache:
            return self._memory_cache[prompt]
        path = self._disk_path(prompt)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                emb = load_file(path)["embedding"].to(self.device)
            except Exception:  # noqa: BLE001 - a broken cache file is re-computed, never fatal
                return None
            self._memory_cache[prompt] = emb
            return emb
        return None

    def _store(self, prompt: str, emb: torch.Tensor) -> None:
        self._memory_cache[prompt] = emb
        path = self._disk_path(prompt)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"embedding": emb.detach().cpu().contiguous()}, tmp, metadata={"prompt": prompt})
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs recomputation

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> torch.Tensor:
        """Stable Diffusion text encoding: pad to the tokenizer's max length, truncate, last hidden state.

        Returns (B, L, D) in the teacher's dtype; cached in memory and on disk per teacher and prompt.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if self._load_cached(p) is None]
        if missing:
            hidden = encode_text(self.tokenizer, self.text_encoder, missing)
            self.text_encoder_calls += 1
            for p, h in zip(missing, hidden):
                self._store(p, h.to(self.dtype))
        return torch.stack([self._memory_cache[p] for p in prompts])

    @property
    def uncond_embedding(self) -> torch.Tensor:
        """Embedding of the empty prompt, (1, L, D): the unconditional branch of classifier-free guidance."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    # ------------------------------------------------------------------ denoising
    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction for noisy latents (v- and x0-prediction teachers converted to epsilon)."""
        x = z_t.to(self.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.unet(x, t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        if self.prediction_type == "v_prediction":
            return eps_from_v(out, z_t.float(), t, self.alphas_cumprod)
        if self.prediction_type == "sample":
            return eps_from_sample(out, z_t.float(), t, self.alphas_cumprod)
        return out

    # ------------------------------------------------------------------ images <-> latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (float32). Pixel teachers: latents = images.

        Uses the VAE posterior mean by default (deterministic); ``sample=True`` draws from it.
        """
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by {f} for this teacher's VAE")
        return vae_encode(self.vae, images, self.latent_scale, sample=sample, generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, clamped)."""
        return vae_decode(self.vae, latents, self.latent_scale)

    @property
    def image_size(self) -> int:
        """The resolution the teacher was trained at (UNet sample size times the VAE factor)."""
        return int(self.unet.config.sample_size) * self.downsample_factor

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float | Callable[[int], float] = Guidance.guidance,
        generator: torch.Generator | None = None,
        size: int | None = None,
        latents: torch.Tensor | None = None,
        timestep_spacing: str | None = None,
        eta: float | Callable[[int], float] = 0.0,
        clip_sample: bool | None = None,
    ) -> torch.Tensor:
        """Text-to-image with DDIM and classifier-free guidance; images in [-1, 1], (B, 3, H, W).
        ``guidance_scale`` may be a function of the timestep; ``timestep_spacing`` (e.g. ``"trailing"``) replaces
        the scheduler config's; ``eta`` > 0 samples stochastically (noise from ``generator``; it may be a function
        of the timestep, too); ``clip_sample`` replaces the config's clamping of each step's predicted clean image to
        [-1, 1]."""
        overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
        if clip_sample is not None:
            overrides["clip_sample"] = clip_sample
        sched = ddim_scheduler(self.scheduler, num_inference_steps, self.device, **overrides)
        size = size or self.image_size
        f = self.downsample_factor
        shape = (len(prompts), self.latent_channels, size // f, size // f)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        emb = self.encode_prompts(prompts)
        z = ddim_cfg_loop(self.unet, sched, latents.to(self.device).float(), emb, self.uncond_embedding.expand_as(emb),
                          guidance_scale, eta=eta, generator=generator)
        return self.decode_latents(z)

    def describe(self) -> dict:
        return {
            "source": getattr(self, "source", None),
            "prediction_type": self.prediction_type,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "latent_scale": self.latent_scale,
            "image_size": self.image_size,
            "has_vae": self.vae is not None,
        }

