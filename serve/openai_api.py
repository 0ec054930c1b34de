"""The OpenAI Images API: POST /v1/images/generations and /v1/images/edits, GET /v1/models.

Requests and answers in OpenAI's shape (https://platform.openai.com/docs/api-reference/images), so that
``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY).images.generate(...)`` works as is. sdrt extras in the
body: negative_prompt, steps, guidance_scale, seed, scheduler, prompt_syntax (and strength for edits).
``response_format="url"`` is refused: images come back inline (``b64_json``).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from .common import (ApiError, bad, check_count, check_guidance, check_prompt_syntax, check_scheduler, check_steps,
                     check_strength, decode_image, encode_image, parse_size, random_seed, run_job, validation_message)
from .service import Job

router = APIRouter()
OUTPUT_FORMATS = ("png", "jpeg", "webp")


class ImageRequest(BaseModel):
    """OpenAI's fields (quality, style, background, moderation, ... are accepted and ignored) and sdrt's."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int = 1
    size: str | None = None  # "WxH" or "auto": the model's native size
    response_format: str | None = None
    output_format: str | None = None
    model: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    prompt_syntax: str | None = None


class EditRequest(ImageRequest):
    strength: float | None = None


def _job(request: Request, body: ImageRequest, image=None, mask=None, strength=None) -> tuple[Job, int, str]:
    service, limits = request.app.state.service, request.app.state.limits
    d = service.defaults()
    if not body.prompt.strip():
        raise bad("prompt must not be empty", "prompt")
    if body.response_format not in (None, "b64_json"):
        raise bad(f"response_format {body.response_format!r} is not served: this server returns images inline; "
                  "use response_format='b64_json' (or leave it out)", "response_format")
    fmt = body.output_format or "png"
    if fmt not in OUTPUT_FORMATS:
        raise bad(f"output_format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}", "output_format")
    check_count(body.n, limits, "n", "n")
    width, height = parse_size(body.size, (d["width"], d["height"]), limits)
    steps = d["steps"] if body.steps is None else body.steps
    check_steps(steps, limits, "steps")
    guidance = d["guidance"] if body.guidance_scale is None else body.guidance_scale
    check_guidance(guidance, "guidance_scale")
    check_scheduler(body.scheduler)
    check_prompt_syntax(body.prompt_syntax)
    check_strength(strength, "strength")
    seed = random_seed() if body.seed is None else body.seed
    if not 0 <= seed < 2**32:
        raise bad(f"seed must be in [0, 2**32), got {seed}", "seed")
    job = Job(body.prompt, [(seed, body.n)], steps, float(guidance), width, height,
              negative_prompt=body.negative_prompt or None, scheduler=body.scheduler, image=image, mask=mask,
              strength=strength, prompt_syntax=body.prompt_syntax)
    return job, seed, fmt


async def _answer(request: Request, job: Job, seed: int, fmt: str) -> dict:
    result = await run_job(request, job)
    data = await run_in_threadpool(lambda: [{"b64_json": encode_image(im, fmt), "revised_prompt": None}
                                            for im in result.images])
    request.app.state.metrics.images.labels(request.scope["route"].path).inc(len(data))
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": fmt,
        "size": f"{job.width}x{job.height}",
        "sdrt": {"seed": seed, "steps": job.steps, "guidance_scale": job.guidance, "scheduler": result.scheduler,
                 "batch_images": result.batch_images},
    }


@router.post("/v1/images/generations")
async def generations(request: Request, body: ImageRequest):
    job, seed, fmt = _job(request, body)
    return await _answer(request, job, seed, fmt)


@router.post("/v1/images/edits")
async def edits(request: Request):
    """Multipart: ``image`` (or ``image[]``, one), optional ``mask``, and the fields of generations. With a
    mask: inpainting, where the mask is transparent (OpenAI's convention) or, for a mask without alpha,
    white; without: image to image at ``strength`` (default 0.8)."""
    try:
        form = await request.form()
    except Exception as e:  # noqa: BLE001  (python-multipart's parse errors)
        raise bad(f"the request body is not valid multipart/form-data ({e})") from None
    files, fields = {}, {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            files.setdefault(key.removesuffix("[]"), []).append(value)
        else:
            fields[key] = value
    try:
        body = EditRequest.model_validate(fields)
    except ValidationError as e:
        raise bad(*validation_message(e.errors())) from None
    images, masks = files.get("image", []), files.get("mask", [])
    if not images:
        raise bad("image is required (a PNG, JPEG or WebP file field)", "image")
    if len(images) > 1 or len(masks) > 1:
        raise bad("give one image (and at most one mask); this server edits one image a request", "image")
    image = decode_image(await images[0].read(), "image")
    mask = _mask(decode_image(await masks[0].read(), "mask")) if masks else None
    job, seed, fmt = _job(request, body, image=image.convert("RGB"), mask=mask, strength=body.strength)
    if mask is not None and mask.size != image.size:
        raise bad(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                  "give a mask of the image's size", "mask")
    return await _answer(request, job, seed, fmt)


def _mask(mask):
    """OpenAI's mask (transparent where to edit) -> sdrt's (white where to repaint); a mask without alpha is
    taken as sdrt's own (white repainted)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask.convert("L")


@router.get("/v1/models")
async def models(request: Request):
    name = request.app.state.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sdrt"}]}


__all__ = ["router", "ApiError"]
