"""The tasks: text to image, image to image, inpainting. Each is a short composition of the stages
(encode prompt -> prepare latents -> denoise; the pipeline checks inputs before and decodes after)
and reproduces one diffusers pipeline: StableDiffusion[XL]Pipeline, StableDiffusion[XL]Img2ImgPipeline,
StableDiffusion[XL]InpaintPipeline. ``pick_task`` chooses from the call's arguments, as diffusers'
AutoPipeline classes do."""

from __future__ import annotations

import numpy as np

from .errors import GenerationError
from .images import downsample_mask
from .manifest import INPAINTING
from .stages import Request, encode_image, encode_prompt, first_step, latent_shape, per_image, run_loop, unet_model


def text_to_image(pipe, req: Request) -> np.ndarray:
    cond = encode_prompt(pipe, req)
    sched = req.scheduler
    noise = req.latents if req.latents is not None else req.rng.standard_normal(latent_shape(pipe, req), dtype=np.float32)
    latents = noise * np.float32(sched.init_noise_sigma)
    return run_loop(pipe, req, unet_model(pipe, req, cond), latents)


def image_to_image(pipe, req: Request) -> np.ndarray:
    """SDEdit (Meng et al. 2022): the image's latents noised to the strength's first step, denoised from there.
    Given latents with ``denoising_start`` (a base's, stopped at ``denoising_end``: the SDXL refiner hand-off),
    they are already at that step's noise level and continue as they are."""
    cond = encode_prompt(pipe, req)
    sched, start = req.scheduler, first_step(req)
    if req.image_latents is not None:
        init = per_image(req.image_latents, req, "latent image")
    else:
        init = encode_image(pipe, req.image, req)
    if req.denoising_start is not None:
        latents = init.astype(np.float32)
    else:
        noise = req.latents if req.latents is not None else req.rng.standard_normal(init.shape, dtype=np.float32)
        latents = sched.add_noise(init, noise, start).astype(np.float32)
    return run_loop(pipe, req, unet_model(pipe, req, cond, start=start), latents, start=start)


def inpaint(pipe, req: Request) -> np.ndarray:
    """Repaint where the mask is 1. An inpainting UNet (9 input channels) sees the mask and the masked
    image's latents as extra channels; an ordinary one (4) is made to keep the known region by blending
    it back, noised to the next step's level, after every step (diffusers' inpainting pipelines, both)."""
    cond = encode_prompt(pipe, req)
    sched, start = req.scheduler, first_step(req)
    concat = pipe.manifest.get("task") == INPAINTING
    full_strength = req.strength == 1.0
    # the image's own latents: to start from (strength < 1, no latents given) and to blend back (4 channels)
    image_latents = encode_image(pipe, req.image, req) if not concat or (req.latents is None and not full_strength) else None
    if req.latents is None:
        noise = req.rng.standard_normal(latent_shape(pipe, req), dtype=np.float32)
        latents = noise * np.float32(sched.init_noise_sigma) if full_strength else sched.add_noise(image_latents, noise, start)
    else:  # given latents are the initial noise, whatever the strength (diffusers' prepare_latents)
        noise = req.latents
        latents = noise * np.float32(sched.init_noise_sigma)
    latents = latents.astype(np.float32)
    mask = per_image(downsample_mask(req.mask, pipe.manifest["vae_scale_factor"]), req, "mask image")  # (B, 1, h, w)
    masked_image = req.image * (req.mask < 0.5)  # the known region, the rest grey (0 in [-1, 1])
    if concat:
        masked_latents = encode_image(pipe, masked_image, req, what="masked image")
        model = unet_model(pipe, req, cond, extra_channels=np.concatenate([mask, masked_latents], axis=1), start=start)
        return run_loop(pipe, req, model, latents, start=start)
    # diffusers encodes the masked image here too, unused by a 4-channel UNet: draw its sample noise, so
    # that noise is drawn in the same order and shapes as there, without running the encoder
    pipe.vae.draw_unused_sample(req.rng, (len(masked_image),) + image_latents.shape[1:])
    last = len(sched.timesteps) - 1

    def blend(x, i):
        known = sched.add_noise(image_latents, noise, i + 1) if i < last else image_latents
        return ((1 - mask) * known + mask * x).astype(np.float32)

    return run_loop(pipe, req, unet_model(pipe, req, cond, start=start), latents, start=start, after_step=blend)


def pick_task(manifest: dict, image, mask_image, refines: bool = False):
    """The task the arguments ask for, as diffusers' AutoPipelineFor* do; an inpainting model needs a mask,
    a refiner (``refines``) an image."""
    if refines and (image is None or mask_image is not None):
        raise GenerationError("this is an SDXL refiner (image to image only): give image= (a picture, or the base's "
                              "latents from output_type='latent' with denoising_end) and no mask_image")
    if mask_image is not None:
        if image is None:
            raise GenerationError("mask_image was given without image; inpainting needs both (the image to repaint)")
        return inpaint
    if manifest.get("task") == INPAINTING:
        raise GenerationError(
            "this is an inpainting model (its UNet takes a mask and a masked image): it needs image and mask_image"
        )
    return image_to_image if image is not None else text_to_image


# the names a result's parameters give the task (the manifest's names, and diffusers' AutoPipeline's)
TASK_NAMES = {text_to_image: "text-to-image", image_to_image: "image-to-image", inpaint: INPAINTING}
