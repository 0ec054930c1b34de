"""The Stable Diffusion pipeline: prompt -> image with a numpy denoising loop around engines.

Reproduces diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline and their SDXL
counterparts (encode_prompt, prepare_latents, the classifier-free-guidance loop, decode) with the
same argument names, so code written for diffusers moves over with few edits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import select
from .errors import GenerationError, ModelDirError, NonFiniteError
from .manifest import load_manifest
from .schedulers import make_scheduler
from .tokenizer import ClipTokenizer


@dataclass
class Timings:
    """Seconds per stage of one call."""

    tokenize: float = 0.0
    text_encoder: float = 0.0
    vae_encoder: float = 0.0
    unet: list = field(default_factory=list)  # one entry per UNet call
    scheduler: float = 0.0  # everything in the loop but the UNet: guidance, scaling, step
    vae_decoder: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict:
        return {
            "tokenize": self.tokenize,
            "text_encoder": self.text_encoder,
            "vae_encoder": self.vae_encoder,
            "unet_total": float(sum(self.unet)),
            "unet_per_call": [float(x) for x in self.unet],
            "scheduler": self.scheduler,
            "vae_decoder": self.vae_decoder,
            "total": self.total,
        }

    def summary(self) -> str:
        n = len(self.unet)
        per = sum(self.unet) / n if n else 0.0
        return (
            f"total {self.total:.2f}s: text encoder {self.tokenize + self.text_encoder:.3f}s, "
            f"UNet {sum(self.unet):.2f}s ({n} calls, {per * 1000:.1f} ms each), "
            f"scheduler {self.scheduler * 1000:.1f} ms, "
            + (f"VAE encoder {self.vae_encoder:.2f}s, " if self.vae_encoder else "")
            + f"VAE decoder {self.vae_decoder:.2f}s"
        )


@dataclass
class PipelineOutput:
    images: list | np.ndarray  # PIL images, or float32 (B, H, W, 3) in [0, 1] for output_type="np"
    timings: Timings
    parameters: dict


def _nearest_multiples(v: int, m: int = 8) -> str:
    lo = max(m, v // m * m)
    hi = lo + m if lo < v else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def _as_list(x, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x) and x:
        return list(x)
    raise GenerationError(f"{name} must be a string or a non-empty list of strings, got {type(x).__name__}")


class Pipeline:
    """A loaded model directory, ready to generate.

    ``Pipeline.load(path, backend="auto")``; then ``pipe(prompt, ...)`` as diffusers' pipelines.
    """

    def __init__(self, model_dir: Path, manifest: dict, backend: str, engines: dict, tokenizers: list,
                 low_memory: bool = False):
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        self.low_memory = low_memory
        self._engines = engines
        self.tokenizers = tokenizers
        self.family = manifest["family"]
        self.scheduler_config = _read_scheduler_config(model_dir)
        # the model's own sampling settings, when its export recorded them (checked by load_manifest)
        self.generation_defaults: dict = dict(manifest.get("generation_defaults") or {})

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", *, threads: int | None = None,
             low_memory: bool = False, cuda_graph: bool = False) -> "Pipeline":
        """``low_memory``: each component is loaded when needed and released after its stage, so
        peak memory is the largest component's rather than the sum (slower: every call reloads).
        ``cuda_graph`` (TensorRT backend): capture the UNet call once and replay it every step."""
        model_dir = Path(path)
        manifest = load_manifest(model_dir)
        kind, engines = select(backend, model_dir, manifest, threads=threads, low_memory=low_memory,
                               cuda_graph=cuda_graph)
        tokenizers = [ClipTokenizer.from_manifest(model_dir, rec) for rec in manifest["tokenizers"]]
        return cls(model_dir, manifest, kind, engines, tokenizers, low_memory=low_memory)

    def engine(self, name: str):
        return self._engines[name]

    def _done_with(self, *names: str) -> None:
        if self.low_memory:
            for name in names:
                if name in self._engines:
                    self._engines[name].close()

    # -- text ------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], t: Timings) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 77, D) hidden states, and for SDXL the (B, P) pooled embedding."""
        t0 = time.perf_counter()
        ids = [tok(prompts) for tok in self.tokenizers]
        t1 = time.perf_counter()
        t.tokenize += t1 - t0
        if self.family != "sdxl":
            out = self.engine("text_encoder")(input_ids=ids[0])
            hidden, pooled = next(iter(out.values())), None
        else:
            h1 = self.engine("text_encoder")(input_ids=ids[0])["hidden_states"]
            out2 = self.engine("text_encoder_2")(input_ids=ids[1])
            hidden, pooled = np.concatenate([h1, out2["hidden_states"]], axis=-1), out2["text_embeds"]
        t.text_encoder += time.perf_counter() - t1
        return hidden, pooled

    # -- the call --------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        image=None,
        strength: float = 0.8,
        scheduler_config: dict | None = None,
        output_type: str = "pil",
        generator: np.random.Generator | None = None,
        callback=None,
    ) -> PipelineOutput:
        """Generate images. ``seed`` makes a numpy Generator (``generator`` passes one directly);
        ``latents`` gives the initial noise (B, C, H/8, W/8) as in diffusers; ``image`` with
        ``strength`` runs image to image. ``callback(step, num_steps)`` is called after each step.
        ``num_inference_steps`` and ``guidance_scale`` default to the model's ``generation_defaults``
        (``sdrt export --default-steps/--default-guidance``), else to diffusers' 50 and 7.5 (5.0 for SDXL)."""
        t_start = time.perf_counter()
        timings = Timings()
        m = self.manifest
        xl = self.family == "sdxl"
        prompts = _as_list(prompt, "prompt")
        native = m["native_resolution"]
        height = native if height is None else height
        width = native if width is None else width
        defaults = self.generation_defaults
        if guidance_scale is None:
            guidance_scale = defaults.get("guidance_scale", 5.0 if xl else 7.5)
        guidance_scale = float(guidance_scale)
        if num_inference_steps is None:
            num_inference_steps = defaults.get("num_inference_steps", 50)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise GenerationError(f"{name} must be a positive integer, got {v!r}")
            if v % 8:
                raise GenerationError(f"{name} {v} is not a multiple of 8; use {_nearest_multiples(v)}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise GenerationError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise GenerationError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if image is not None and not (0.0 < strength <= 1.0):
            raise GenerationError(f"strength must be in (0, 1], got {strength}")
        if output_type not in ("pil", "np"):
            raise GenerationError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise GenerationError(
                    f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one negative prompt, or one per prompt"
                )
        try:
            sched = make_scheduler(scheduler, self.scheduler_config, scheduler_config)
            sched.set_timesteps(num_inference_steps)
        except ValueError as e:
            raise GenerationError(str(e)) from e
        rng = generator if generator is not None else np.random.default_rng(seed)
        init = None if image is None else _load_image(image, height, width)

        batch = len(prompts) * num_images_per_prompt
        cfg = guidance_scale > 1.0
        lat_shape = (batch, m["latent_channels"], height // m["vae_scale_factor"], width // m["vae_scale_factor"])
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != lat_shape:
                raise GenerationError(f"latents have shape {latents.shape}, expected {lat_shape} for this batch and size")

        # prompt embeddings: (B, 77, D), negatives first as diffusers concatenates them
        hidden, pooled = self._encode(prompts, timings)
        hidden = np.repeat(hidden, num_images_per_prompt, axis=0)
        pooled = None if pooled is None else np.repeat(pooled, num_images_per_prompt, axis=0)
        if cfg:
            if xl and negatives is None and m.get("force_zeros_for_empty_prompt", True):
                neg_hidden, neg_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
            else:
                neg_hidden, neg_pooled = self._encode(negatives or [""] * len(prompts), timings)
                neg_hidden = np.repeat(neg_hidden, num_images_per_prompt, axis=0)
                neg_pooled = None if neg_pooled is None else np.repeat(neg_pooled, num_images_per_prompt, axis=0)
            hidden = np.concatenate([neg_hidden, hidden])
            pooled = None if pooled is None else np.concatenate([neg_pooled, pooled])
        self._done_with("text_encoder", "text_encoder_2")
        unet_batch = hidden.shape[0]
        extra = {}
        if xl:
            # original_size + crops_coords_top_left + target_size (StableDiffusionXLPipeline._get_add_time_ids)
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            extra = {"text_embeds": pooled, "time_ids": np.tile(time_ids, (unet_batch, 1))}

        # initial latents
        start = 0
        if init is None:
            if latents is None:
                latents = rng.standard_normal(lat_shape, dtype=np.float32)
            latents = latents * np.float32(sched.init_noise_sigma)
        else:
            t0 = time.perf_counter()
            init_latents = self._encode_image(init, rng, len(prompts), num_images_per_prompt)
            self._done_with("vae_encoder")
            timings.vae_encoder = time.perf_counter() - t0
            init_steps = min(int(num_inference_steps * strength), num_inference_steps)
            start = max(num_inference_steps - init_steps, 0) * sched.order
            sched.set_begin_index(start)
            if start >= len(sched.timesteps):
                raise GenerationError(
                    f"strength {strength} with {num_inference_steps} steps leaves no denoising step; raise strength or steps"
                )
            noise = latents if latents is not None else rng.standard_normal(init_latents.shape, dtype=np.float32)
            latents = sched.add_noise(init_latents, noise, start).astype(np.float32)

        unet = self.engine("unet")
        n_steps = len(sched.timesteps) - start
        for k, i in enumerate(range(start, len(sched.timesteps))):
            t0 = time.perf_counter()
            t = sched.timesteps[i]
            x = np.concatenate([latents, latents]) if cfg else latents
            x = sched.scale_model_input(x, i).astype(np.float32, copy=False)
            t1 = time.perf_counter()
            eps = unet(sample=x, timestep=np.full((unet_batch,), t, np.float32), encoder_hidden_states=hidden, **extra)
            eps = eps["out_sample"]
            t2 = time.perf_counter()
            if not np.isfinite(eps).all():
                raise NonFiniteError(
                    f"the UNet produced NaN or Inf at step {k + 1}/{n_steps} (timestep {t:g}); no image was written. "
                    "An fp16 graph overflowing is the usual cause: re-export without --fp16"
                )
            if cfg:
                uncond, cond = eps[: len(latents)], eps[len(latents):]
                eps = uncond + np.float32(guidance_scale) * (cond - uncond)
            noise = rng.standard_normal(latents.shape, dtype=np.float32) if sched.needs_noise_at(i) else None
            latents = sched.step(eps, i, latents, noise=noise).astype(np.float32, copy=False)
            if not np.isfinite(latents).all():
                cfg_ = sched.config
                zero_snr_eps = cfg_.get("rescale_betas_zero_snr") and cfg_.get("prediction_type") == "epsilon"
                raise NonFiniteError(
                    f"the {sched.name} scheduler step produced NaN or Inf at step {k + 1}/{n_steps} (timestep {t:g}); "
                    "no image was written. "
                    + ("rescale_betas_zero_snr with prediction_type epsilon divides by zero at the last training "
                       "timestep: use it with a v-prediction model" if zero_snr_eps else "check the scheduler settings")
                )
            timings.unet.append(t2 - t1)
            timings.scheduler += (t1 - t0) + (time.perf_counter() - t2)
            if callback is not None:
                callback(k + 1, n_steps)

        self._done_with("unet")
        t0 = time.perf_counter()
        images = self._decode(latents)
        self._done_with("vae_decoder")
        timings.vae_decoder = time.perf_counter() - t0
        timings.total = time.perf_counter() - t_start
        params = {
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": negative_prompt,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "seed": seed,
            "scheduler": sched.name,
            "scheduler_config": scheduler_config,
            "strength": strength if image is not None else None,
            "model": self.model_dir.name,
            "backend": self.backend,
        }
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]
        return PipelineOutput(images, timings, params)

    # -- VAE -------------------------------------------------------------------------------

    def _encode_image(self, image: np.ndarray, rng, n_prompts: int, per_prompt: int) -> np.ndarray:
        """image (N, 3, H, W) in [-1, 1] -> scaled latents (n_prompts * per_prompt, C, h, w), sampled
        from the encoder's distribution as diffusers' retrieve_latents(sample_mode="sample")."""
        m = self.manifest
        if len(image) not in (1, n_prompts * per_prompt) and len(image) != n_prompts:
            raise GenerationError(f"{len(image)} init images for {n_prompts} prompts; give one image, or one per prompt")
        params = self.engine("vae_encoder")(sample=image)["latent_parameters"]
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        if m.get("vae_shift_factor") is not None:
            latents = latents - np.float32(m["vae_shift_factor"])
        latents = (latents * np.float32(m["vae_scaling_factor"])).astype(np.float32)
        batch = n_prompts * per_prompt
        if len(latents) == 1:
            return np.repeat(latents, batch, axis=0)
        if len(latents) == n_prompts and per_prompt > 1:
            return np.repeat(latents, per_prompt, axis=0)
        return latents

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        m = self.manifest
        z = latents / np.float32(m["vae_scaling_factor"])
        if m.get("vae_shift_factor") is not None:
            z = z + np.float32(m["vae_shift_factor"])
        image = self.engine("vae_decoder")(latent_sample=z.astype(np.float32))["sample"]  # (B, 3, H, W) in [-1, 1]
        if not np.isfinite(image).all():
            raise NonFiniteError(
                "the VAE decoder produced NaN or Inf; no image was written. An fp16 VAE overflowing is the usual "
                "cause: re-export without --fp16-vae"
            )
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def close(self) -> None:
        for e in self._engines.values():
            e.close()


def _read_scheduler_config(model_dir: Path) -> dict:
    import json

    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
    return json.loads(path.read_text(encoding="utf-8"))


def _load_image(image, height: int, width: int) -> np.ndarray:
    """An init image -> (N, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess:
    a path or PIL image is resized (Lanczos) to height x width; numpy input (N, H, W, 3) or
    (H, W, 3) in [0, 1] is taken as is."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise GenerationError(f"cannot read the init image {image}: {e}") from e
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        arr = np.asarray(image, dtype=np.float32)[None] / 255.0
    elif isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise GenerationError(f"a numpy init image must be (H, W, 3) or (N, H, W, 3) in [0, 1], got shape {image.shape}")
        if arr.shape[1:3] != (height, width):
            raise GenerationError(f"the init image is {arr.shape[2]}x{arr.shape[1]}, the call asks for {width}x{height}")
    else:
        raise GenerationError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    return (arr.transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)
