"""The denoising loop, in k-diffusion's style: a model callable ``(x, t) -> prediction``, a scheduler
and latents. Classifier-free guidance, a task's extra UNet channels and ControlNet residuals are small wrappers
around the model call; a task's per-step work (inpainting's blend) enters as an argument.

    model = guided(unet_callable(engine, record, conditioning, timings), scale)
    latents = denoise(model, scheduler, latents, rng, start=start)
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .errors import NonFiniteError

Model = Callable[..., np.ndarray]  # (B, C, h, w) scaled latents, timestep[, more named UNet inputs] -> (B, C, h, w)


def unet_callable(engine, record: dict, conditioning: list[np.ndarray], unet_times: list | None = None) -> Model:
    """The UNet engine as ``(x, t) -> prediction``. Inputs are bound by the order the manifest's record
    lists them: sample, timestep, then ``conditioning`` (the family's: hidden states, ...); the output
    is the record's first; further named inputs (ControlNet residuals) come with each call. ``unet_times``
    collects the seconds of each call."""
    names = [t["name"] for t in record["inputs"]]
    sample, timestep = names[0], names[1]
    # each input as its record declares it: the timestep one per row ([batch]) or one for all ([], optimum's)
    t_spec = record["inputs"][1]
    t_dtype, t_scalar = np.dtype(t_spec.get("dtype", "float32")), len(t_spec["shape"]) == 0
    rest = {n: np.asarray(c).astype(spec["dtype"], copy=False)
            for n, c, spec in zip(names[2:], conditioning, record["inputs"][2:])}
    out = record["outputs"][0]["name"]

    def model(x, t, **inputs):
        t0 = time.perf_counter()
        ts = np.asarray(t, t_dtype) if t_scalar else np.full((len(x),), t, t_dtype)
        y = engine(**{sample: x, timestep: ts}, **rest, **inputs)[out]
        if unet_times is not None:
            unet_times.append(time.perf_counter() - t0)
        return y

    return model


def with_channels(model: Model, extra: np.ndarray) -> Model:
    """Feed ``extra`` (B, E, h, w) as more input channels after the latents (an inpainting UNet's mask and
    masked-image latents), as diffusers' inpainting pipelines concatenate them after scaling."""

    def wrapped(x, t, **inputs):
        return model(np.concatenate([x, extra], axis=1), t, **inputs)

    return wrapped


def with_controlnet(model: Model, controlnets: list, scales, zeros: Callable[[np.ndarray], dict]) -> Model:
    """ControlNet residuals (Zhang et al. 2023) as more UNet inputs: before each call, every ControlNet
    ``(x, t) -> {name: residual}`` whose scale for this step is not 0 runs on the same latents, and its residuals,
    times the scale, are summed in order (diffusers' MultiControlNetModel); ``zeros(x)`` when none acts.
    ``scales`` yields one list of scales (one per ControlNet) per call: the loop calls the model once a step.
    Wrap it inside ``guided`` (ControlNets see the 2B batch) and outside ``with_channels`` (they see the latents
    alone, as diffusers' inpainting ControlNet pipeline feeds them)."""
    scales = iter(scales)

    def wrapped(x, t):
        total = None
        for net, scale in zip(controlnets, next(scales)):
            if scale == 0.0:  # diffusers multiplies by 0: zeros either way
                continue
            s = np.float32(scale)
            res = {k: v * s for k, v in net(x, t).items()}
            total = res if total is None else {k: total[k] + v for k, v in res.items()}
        return model(x, t, **(total if total is not None else zeros(x)))

    return wrapped


def guided(model: Model, scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022): the unconditional and conditional predictions in one
    batch of 2B, negatives first, as diffusers runs them; ``model``'s conditioning holds 2B rows."""
    scale = np.float32(scale)

    def wrapped(x, t):
        uncond, cond = np.split(model(np.concatenate([x, x]), t), 2)
        return uncond + scale * (cond - uncond)

    return wrapped


def denoise(model: Model, scheduler, latents: np.ndarray, rng, *, start: int = 0, stop: int | None = None,
            after_step: Callable[[np.ndarray, int], np.ndarray] | None = None,
            callback: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Run ``scheduler``'s steps ``start..stop`` (to the last by default) on ``latents``. ``rng.standard_normal``
    gives the fresh noise of stochastic steps; ``after_step(latents, i)`` runs after step ``i`` (inpainting's
    blend); ``callback(k, n)`` after each of the n steps."""
    timesteps = scheduler.timesteps
    stop = len(timesteps) if stop is None else stop
    n = stop - start
    for k, i in enumerate(range(start, stop)):
        t = timesteps[i]
        pred = model(scheduler.scale_model_input(latents, i).astype(np.float32, copy=False), t)
        _check_finite(pred, lambda: f"the UNet produced NaN or Inf at step {k + 1}/{n} (timestep {t:g}); "
                      "no image was written. An fp16 graph overflowing is the usual cause: re-export without --fp16")
        noise = rng.standard_normal(latents.shape, dtype=np.float32) if scheduler.needs_noise(i) else None
        latents = scheduler.step(pred, i, latents, noise=noise).astype(np.float32, copy=False)
        _check_finite(latents, lambda: _step_message(scheduler, k, n, t))
        if after_step is not None:
            latents = after_step(latents, i)
        if callback is not None:
            callback(k + 1, n)
    return latents


def _check_finite(x: np.ndarray, message: Callable[[], str]) -> None:
    if not np.isfinite(x).all():
        raise NonFiniteError(message())


def _step_message(scheduler, k: int, n: int, t: float) -> str:
    cfg = scheduler.config
    zero_snr_eps = cfg.get("rescale_betas_zero_snr") and cfg.get("prediction_type") == "epsilon"
    return (
        f"the {scheduler.name} scheduler step produced NaN or Inf at step {k + 1}/{n} (timestep {t:g}); "
        "no image was written. "
        + ("rescale_betas_zero_snr with prediction_type epsilon divides by zero at the last training "
           "timestep: use it with a v-prediction model" if zero_snr_eps else "check the scheduler settings")
    )
