"""AUTOMATIC1111's web UI API: POST /sdapi/v1/txt2img and /img2img; GET samplers, schedulers, sd-models,
progress, options, scripts.

Request fields and answers as the webui's modules/api/models.py and processing.py (Processed.js) write
them, so its clients (the ``webuiapi`` package, scripts written for the webui) work unchanged: images as
base64 PNGs (with the webui's ``parameters`` infotext), ``parameters`` the request, ``info`` a JSON string
with seed, all_seeds, infotexts and the rest. As in the webui, image i of a request has seed ``seed + i``
(-1: a random seed), prompts read the webui's attention syntax ("(word:1.2)", "[word]", BREAK), and
sampler names are the webui's (runtime/a1111.py). What sdrt does not do (hires fix, face restoration,
tiling, variation seeds, scripts) is refused with a 400 when asked for, ignored at its default.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from sdrt.runtime import a1111
from sdrt.runtime.infotext import create_infotext

from .common import (bad, check_count, check_guidance, check_size, check_steps, check_strength, decode_image,
                     encode_image, random_seed, run_job)
from .service import Job

router = APIRouter(prefix="/sdapi/v1")


class Txt2Img(BaseModel):
    """StableDiffusionTxt2ImgProcessingAPI's fields that change the image; the rest are accepted and ignored.
    Unset steps, cfg_scale, width, height and sampler take the model's own defaults (the webui's are 50, 7,
    512x512 and Euler)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the webui's older name for sampler_name
    scheduler: str | None = None  # the schedule type ("Automatic", "Karras", ...)
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    denoising_strength: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    script_name: str | None = None
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] | None = None


class Img2Img(Txt2Img):
    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: int = 0
    denoising_strength: float | None = 0.75
    include_init_images: bool = False


def _unsupported(body: Txt2Img) -> None:
    for name, asked in (("enable_hr", body.enable_hr), ("restore_faces", body.restore_faces),
                        ("tiling", body.tiling), ("subseed_strength", body.subseed_strength not in (0, None)),
                        ("script_name", bool(body.script_name))):
        if asked:
            raise bad(f"{name} is not supported by sdrt's AUTOMATIC1111 API; leave it at its default", name)


def _job(request: Request, body: Txt2Img, image=None, mask=None, strength=None) -> tuple[Job, list[int], str]:
    service, limits = request.app.state.service, request.app.state.limits
    d = service.defaults()
    _unsupported(body)
    check_count(body.batch_size, limits, "batch_size", "batch_size")
    check_count(body.n_iter, limits, "n_iter", "n_iter")
    count = body.batch_size * body.n_iter
    check_count(count, limits, "batch_size", "batch_size x n_iter")
    width = d["width"] if body.width is None else body.width
    height = d["height"] if body.height is None else body.height
    check_size(width, height, limits, "width x height")
    steps = d["steps"] if body.steps is None else body.steps
    check_steps(steps, limits, "steps")
    cfg = d["guidance"] if body.cfg_scale is None else body.cfg_scale
    check_guidance(cfg, "cfg_scale")
    check_strength(strength, "denoising_strength")
    sampler = body.sampler_name or body.sampler_index
    try:
        scheduler = a1111.scheduler_for(sampler, body.scheduler) if sampler else None
    except ValueError as e:
        raise bad(str(e), "sampler_name") from None
    seed = random_seed() if body.seed is None or body.seed < 0 else body.seed
    seeds = [(seed + i) % 2**32 for i in range(count)]
    job = Job(body.prompt, [(s, 1) for s in seeds], steps, float(cfg), width, height,
              negative_prompt=body.negative_prompt or None, scheduler=scheduler, image=image, mask=mask,
              strength=strength, prompt_syntax="a1111")
    return job, seeds, sampler


def _infotext(job: Job, scheduler: str, seed: int, model: tuple[str, str], strength) -> str:
    """The webui's create_infotext for one image of the job (runtime/infotext.py, as sdrt's PNGs carry it)."""
    return create_infotext({"prompt": job.prompt, "negative_prompt": job.negative_prompt, "num_inference_steps": job.steps,
                            "scheduler": scheduler, "guidance_scale": job.guidance, "seed": seed, "width": job.width,
                            "height": job.height, "model_hash": model[1], "model": model[0], "strength": strength,
                            "version": f"sdrt {_version()}"})


def _version() -> str:
    from sdrt import __version__

    return __version__


async def _answer(request: Request, body: Txt2Img, job: Job, seeds: list[int], parameters: dict) -> dict:
    result = await run_job(request, job)
    sampler, schedule = a1111.sampler_name(result.scheduler)
    model = model_name_and_hash(request)
    strength = job.strength if job.image is not None else None
    infotexts = [_infotext(job, result.scheduler, s, model, strength) for s in seeds]
    images = []
    if body.send_images:
        images = await run_in_threadpool(lambda: [encode_image(im, "png", {"parameters": t})
                                                  for im, t in zip(result.images, infotexts)])
    request.app.state.metrics.images.labels(request.scope["route"].path).inc(len(result.images))
    n = len(seeds)
    info = {
        "prompt": job.prompt, "all_prompts": [job.prompt] * n,
        "negative_prompt": job.negative_prompt or "", "all_negative_prompts": [job.negative_prompt or ""] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": seeds[0], "all_subseeds": seeds, "subseed_strength": 0,
        "width": job.width, "height": job.height, "sampler_name": sampler, "cfg_scale": job.guidance,
        "steps": job.steps, "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model[0], "sd_model_hash": model[1], "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": schedule}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": body.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": request.app.state.service.manifest.get("task") == "inpainting",
        "version": f"sdrt {_version()}",
    }
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request, body: Txt2Img):
    job, seeds, _ = _job(request, body)
    return await _answer(request, body, job, seeds, body.model_dump())


@router.post("/img2img")
async def img2img(request: Request, body: Img2Img):
    if not body.init_images:
        raise bad("init_images is required: a list with one base64 image", "init_images")
    if len(body.init_images) > 1:
        raise bad("give one init image; sdrt's img2img takes one a request", "init_images")
    image = decode_image(body.init_images[0], "init_images[0]").convert("RGB")
    mask = None
    if body.mask:
        mask = decode_image(body.mask, "mask").convert("L")
        if mask.size != image.size:
            raise bad(f"mask is {mask.size[0]}x{mask.size[1]} but the init image is {image.size[0]}x{image.size[1]}; "
                      "give a mask of the image's size", "mask")
        if body.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    job, seeds, _ = _job(request, body, image=image, mask=mask, strength=strength)
    parameters = body.model_dump()
    if not body.include_init_images:  # as the webui answers
        parameters.update(init_images=None, mask=None)
    return await _answer(request, body, job, seeds, parameters)


def model_name_and_hash(request: Request) -> tuple[str, str]:
    """The model's name and the webui's short hash (the first 10 hex digits of a sha256: here the UNet's)."""
    manifest = request.app.state.service.manifest
    sha = manifest["components"]["unet"].get("sha256") or ""
    return request.app.state.model_name, sha[:10]


@router.get("/samplers")
async def samplers():
    return a1111.samplers()


@router.get("/schedulers")
async def schedulers():
    types = sorted({s for _, s in a1111.SAMPLERS.values()}, key=lambda s: s != "Automatic")
    return [{"name": s.lower(), "label": s, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for s in types]


@router.get("/sd-models")
async def sd_models(request: Request):
    name, short = model_name_and_hash(request)
    service = request.app.state.service
    return [{"title": f"{name} [{short}]", "model_name": name, "hash": short,
             "sha256": service.manifest["components"]["unet"].get("sha256"),
             "filename": str(service.model_dir), "config": None}]


@router.get("/options")
async def options(request: Request):
    name, short = model_name_and_hash(request)
    return {"sd_model_checkpoint": f"{name} [{short}]", "samples_format": "png"}


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/progress")
async def progress(request: Request):
    service = request.app.state.service
    p = dict(service.progress)
    steps, step = p["steps"], p["step"]
    fraction = step / steps if steps else 0.0
    elapsed = time.time() - p["started"] if p["started"] else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                  "job_count": service.queued + p["jobs"],
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p["started"] or time.time())),
                  "job_no": 0, "sampling_step": step, "sampling_steps": steps},
        "current_image": None,
        "textinfo": None,
    }
