"""The stages every task composes: a checked request, prompt encoding, image encoding, the UNet as a
model callable, decoding. Each reproduces the diffusers pipeline step of the same name
(StableDiffusion[XL]Pipeline.encode_prompt, retrieve_latents, prepare_latents, decode_latents)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import prompts
from .errors import GenerationError, NonFiniteError
from .families import Conditioning
from .families.base import unet_inputs
from .loop import Model, denoise, guided, unet_callable, with_channels


@dataclass
class Timings:
    """Seconds per stage of one call."""

    tokenize: float = 0.0
    text_encoder: float = 0.0
    vae_encoder: float = 0.0
    unet: list = field(default_factory=list)  # one entry per UNet call
    controlnet: list = field(default_factory=list)  # one entry per ControlNet call
    scheduler: float = 0.0  # everything in the loop but the UNet and ControlNets: guidance, scaling, step
    vae_decoder: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict:
        return {
            "tokenize": self.tokenize,
            "text_encoder": self.text_encoder,
            "vae_encoder": self.vae_encoder,
            "unet_total": float(sum(self.unet)),
            "unet_per_call": [float(x) for x in self.unet],
            **({"controlnet_total": float(sum(self.controlnet)), "controlnet_calls": len(self.controlnet)}
               if self.controlnet else {}),
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
            + (f"ControlNet {sum(self.controlnet):.2f}s ({len(self.controlnet)} calls), " if self.controlnet else "")
            + f"scheduler {self.scheduler * 1000:.1f} ms, "
            + (f"VAE encoder {self.vae_encoder:.2f}s, " if self.vae_encoder else "")
            + f"VAE decoder {self.vae_decoder:.2f}s"
        )


@dataclass
class Request:
    """One generation call's inputs, checked (Pipeline.__call__ builds it) and what the call is given to
    work with: the scheduler set to its steps, the noise source, the timings being filled. The prompts
    come as text (``prompts``, read in ``prompt_syntax``) or as diffusers' embeddings (``prompt_embeds``)."""

    prompts: list[str] | None
    negatives: list[str] | None
    per_prompt: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: object
    rng: object
    latents: np.ndarray | None = None
    image: np.ndarray | None = None  # (N, 3, H, W) in [-1, 1]
    mask: np.ndarray | None = None  # (N, 1, H, W) of 0 (keep) / 1 (repaint)
    strength: float = 1.0
    callback: object = None
    prompt_syntax: str = "none"
    prompt_embeds: Conditioning | None = None  # one row per prompt
    negative_embeds: Conditioning | None = None
    image_latents: np.ndarray | None = None  # (N, C, h, w): ``image`` given as latents (a base's, for a refiner)
    denoising_start: float | None = None  # the fraction of the schedule already run (by a base), or None
    denoising_end: float | None = None  # the fraction of the schedule to run before handing over, or None
    aesthetic_score: float = 6.0  # the SDXL refiner's micro-conditioning (positive and negative rows)
    negative_aesthetic_score: float = 2.5
    controls: list | None = None  # runtime/controlnet.Control, one per ControlNet of the call, or None
    timings: Timings = field(default_factory=Timings)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) if self.prompts is not None else len(self.prompt_embeds)

    @property
    def batch(self) -> int:
        return self.num_prompts * self.per_prompt

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


def run_single(pipe, component: str, x: np.ndarray) -> np.ndarray:
    """A one-input, one-output component (the VAE's halves), by the names its record gives."""
    rec = pipe.manifest["components"][component]
    return pipe.engine(component)(**{rec["inputs"][0]["name"]: x})[rec["outputs"][0]["name"]]


def encode_prompt(pipe, req: Request) -> Conditioning:
    """The UNet's conditioning for the batch: (B, L, D) rows per image, and under guidance the negatives
    first (2B rows), as diffusers' encode_prompt + torch.cat([negative, positive]). L is 77, or 77·k for
    prompts read in chunks (prompt_syntax); the shorter of positive and negative is padded with the empty
    prompt's chunk, as compel and the webui do."""
    family, t = pipe.family, req.timings

    def encode(texts):
        t0 = time.perf_counter()
        tokens = prompts.tokenize(texts, req.prompt_syntax, pipe.tokenizers, with_pooled=family.has_pooled)
        t1 = time.perf_counter()
        cond = tokens.encode(family, pipe.engines, pipe.manifest)
        t.tokenize += t1 - t0
        t.text_encoder += time.perf_counter() - t1
        return cond.repeat(req.per_prompt)

    cond = encode(req.prompts) if req.prompt_embeds is None else req.prompt_embeds.repeat(req.per_prompt)
    if req.cfg:
        if req.negative_embeds is not None:
            negative = req.negative_embeds.repeat(req.per_prompt)
        else:
            negative = family.negative_for_empty_prompt(cond, pipe.manifest) if req.negatives is None else None
            if negative is None:
                negative = encode(req.negatives or [""] * req.num_prompts)
        negative, cond = same_length(pipe, negative, cond)
        cond = Conditioning.concat(negative, cond)
    check_text_length(pipe.manifest, cond.hidden.shape[1])
    pipe.done_with(*family.text_encoders)
    return cond


def same_length(pipe, a: Conditioning, b: Conditioning) -> tuple[Conditioning, Conditioning]:
    """``a`` and ``b`` with the shorter padded with the empty prompt's 77-token chunk."""
    if a.hidden.shape[1] == b.hidden.shape[1]:
        return a, b
    empty = pipe.family.encode_text(pipe.engines, pipe.manifest, prompts.empty_row(pipe.tokenizers)).hidden[0]
    n = max(a.hidden.shape[1], b.hidden.shape[1])
    return tuple(Conditioning(prompts.pad_to_length(c.hidden, n, empty), c.pooled) for c in (a, b))


def check_text_length(manifest: dict, length: int) -> None:
    """A UNet exported with a fixed text length (77, before sdrt read prompts in chunks) takes no more."""
    fixed = unet_inputs(manifest)[2]["shape"][1]
    if isinstance(fixed, int) and length != fixed:
        raise GenerationError(
            f"the prompt needs {length} tokens of text conditioning and this model's UNet takes {fixed}; "
            f"re-export the model with this sdrt (`sdrt export CHECKPOINT --out DIR --overwrite`) for long prompts"
        )


def unet_model(pipe, req: Request, cond: Conditioning, extra_channels: np.ndarray | None = None,
               start: int = 0) -> Model:
    """The UNet as the loop's model: bound to the family's conditioning, fed ``extra_channels`` (B, E, h, w)
    after the latents when given, under classifier-free guidance when the scale asks for it. With the request's
    ControlNets, the UNet that takes their residuals, each ControlNet run before it (runtime/controlnet.py),
    its scale per step counted from the loop's first step ``start``."""
    from .controlnet import unet_component, with_controls

    conditioning = pipe.family.unet_conditioning(cond, pipe.manifest, req)
    unet = unet_component(pipe.manifest, req.controls)
    model = unet_callable(pipe.engine(unet), pipe.manifest["components"][unet], conditioning, req.timings.unet)
    if extra_channels is not None:
        model = with_channels(model, np.concatenate([extra_channels] * 2) if req.cfg else extra_channels)
    if req.controls:
        model = with_controls(pipe, req, model, conditioning, start)
    return guided(model, req.guidance_scale) if req.cfg else model


def run_loop(pipe, req: Request, model: Model, latents: np.ndarray, *, start: int = 0, after_step=None) -> np.ndarray:
    """loop.denoise over the request's scheduler and noise, timed: the UNet's calls time themselves,
    the rest of the loop (guidance, scaling, the step rule, a task's per-step work) is the scheduler's.
    Under low_memory the VAE encoder (every task has encoded its images by now) and, after, the UNet
    are released."""
    pipe.done_with("vae_encoder")
    t0, unet0 = time.perf_counter(), sum(req.timings.unet) + sum(req.timings.controlnet)
    latents = denoise(model, req.scheduler, latents, req.rng, start=start, stop=stop_step(req, start),
                      after_step=after_step, callback=req.callback)
    req.timings.scheduler += time.perf_counter() - t0 - (sum(req.timings.unet) + sum(req.timings.controlnet) - unet0)
    pipe.done_with("unet", *(c.record["component"] for c in req.controls or ()),
                   *([pipe.manifest["controlnet_unet"]] if req.controls else []))
    return latents


def latent_shape(pipe, req: Request) -> tuple[int, int, int, int]:
    f = pipe.manifest["vae_scale_factor"]
    return (req.batch, pipe.manifest["latent_channels"], req.height // f, req.width // f)


def first_step(req: Request) -> int:
    """The index of the first step that runs (diffusers' get_timesteps): at ``strength``, the last
    int(steps * strength) steps, each counted ``scheduler.order`` times; with ``denoising_start``, the steps
    whose timestep lies below its cut-off (completed to a whole step for a second-order scheduler), strength
    ignored."""
    sched, n = req.scheduler, req.steps
    if req.denoising_start is not None:
        count = int((np.asarray(sched.timesteps) < _cutoff(sched, req.denoising_start)).sum())
        if sched.order == 2 and count % 2 == 0:
            count += 1  # every timestep but the highest is doubled: do not start between a step's two halves
        start = len(sched.timesteps) - count
        if count == 0:
            raise GenerationError(f"denoising_start {req.denoising_start} with {n} steps leaves no denoising step; "
                                  "lower denoising_start or raise the steps")
        return start
    start = max(n - min(int(n * req.strength), n), 0) * sched.order
    if start >= len(sched.timesteps):
        raise GenerationError(f"strength {req.strength} with {n} steps leaves no denoising step; raise strength or steps")
    return start


def stop_step(req: Request, start: int) -> int:
    """One past the last step that runs: with ``denoising_end``, the steps from ``start`` whose timestep is at or
    above its cut-off (the rest is left to a refiner), as diffusers' SDXL pipelines cut their timesteps."""
    timesteps = np.asarray(req.scheduler.timesteps)
    if req.denoising_end is None:
        return len(timesteps)
    count = int((timesteps[start:] >= _cutoff(req.scheduler, req.denoising_end)).sum())
    if count == 0:
        raise GenerationError(f"denoising_end {req.denoising_end} with {req.steps} steps leaves no denoising step; "
                              "raise denoising_end or the steps")
    return start + count


def _cutoff(sched, fraction: float) -> int:
    """The training timestep a fraction of the schedule ends at (diffusers' discrete_timestep_cutoff)."""
    train = sched.config.get("num_train_timesteps", 1000)
    return int(round(train - fraction * train))


def per_image(x: np.ndarray, req: Request, what: str) -> np.ndarray:
    """Rows of ``x`` for each image of the batch: one row for all, one per prompt, or one per image.
    One per prompt goes to each of that prompt's images (diffusers tiles such a list over the batch
    instead, which pairs image i with prompt i only when num_images_per_prompt is 1)."""
    check_rows(len(x), req, what)
    if len(x) == req.batch:
        return x
    return np.repeat(x, req.batch if len(x) == 1 else req.per_prompt, axis=0)


def check_rows(n: int, req: Request, what: str) -> None:
    """``n`` images (or masks) are one for all, one per prompt, or one per image of the batch."""
    if n not in (1, req.num_prompts, req.batch):
        raise GenerationError(f"{n} {what}s for {req.num_prompts} prompts; give one {what}, or one per prompt")


def encode_image(pipe, image: np.ndarray, req: Request, what: str = "init image") -> np.ndarray:
    """image (N, 3, H, W) in [-1, 1] -> scaled latents, one row per image of the batch: sampled from the
    encoder's distribution with ``req.rng`` as diffusers' retrieve_latents(sample_mode="sample"), or as an
    AutoencoderTiny gives them (runtime/vae.py); tiled when the pipeline's VAE tiling is on."""
    check_rows(len(image), req, what)  # before the encoder runs
    t0 = time.perf_counter()
    latents = pipe.vae.encode(lambda x: run_single(pipe, "vae_encoder", x), image, req.rng, tiled=pipe.vae_tiling)
    req.timings.vae_encoder += time.perf_counter() - t0
    return per_image(latents, req, what)


def decode(pipe, latents: np.ndarray, req: Request) -> np.ndarray:
    """Scaled latents -> float32 (B, H, W, 3) images in [0, 1]; tiled when the pipeline's VAE tiling is on."""
    t0 = time.perf_counter()
    image = pipe.vae.decode(lambda z: run_single(pipe, "vae_decoder", z), latents, tiled=pipe.vae_tiling)  # (B, 3, H, W)
    if not np.isfinite(image).all():
        raise NonFiniteError(
            "the VAE decoder produced NaN or Inf; no image was written. An fp16 VAE overflowing is the usual "
            "cause: re-export without --fp16-vae"
        )
    pipe.done_with("vae_decoder")
    req.timings.vae_decoder += time.perf_counter() - t0
    return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)
