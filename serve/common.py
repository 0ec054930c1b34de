"""What both APIs share: the server's limits, errors as JSON bodies, request checks, images in and out, and
waiting for a job while watching the client."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import secrets
from dataclasses import dataclass

from fastapi import Request

from .service import Dropped, Job, Overloaded, Result, ShuttingDown


@dataclass
class Limits:
    """What one request may ask for (``sdrt serve --max-images/--max-size/--max-steps/--max-body-mib``)."""

    max_images: int = 8
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_body_bytes: int = 64 << 20  # a request's body: room for a few 2048x2048 PNGs in base64


class ApiError(Exception):
    """An answer other than 200: ``status``, a message saying what was wrong, the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, *, kind: str = "bad_request",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return error_body(self.message, self.param, _ERROR_TYPES.get(self.status, "invalid_request_error"))


_ERROR_TYPES = {401: "authentication_error", 499: "client_closed_request", 500: "server_error", 503: "overloaded"}


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    """OpenAI's error shape (``error.message``, which the openai package raises with), and ``detail`` as
    FastAPI and AUTOMATIC1111's API answer errors."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}, "detail": message}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors (RequestValidationError.errors()) as one line, and the first field at fault."""
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form")]
        field = ".".join(loc)
        if e.get("type") == "json_invalid":  # its loc is a position in the text, not a field
            parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
            continue
        param = param or (field or None)
        if e.get("type") == "missing":
            parts.append(f"{field} is required" if field else "a JSON object body is required")
        elif field:
            given = repr(e.get("input"))
            parts.append(f"{field}: {e.get('msg')}, got {given if len(given) <= 60 else given[:57] + '...'}")
        else:
            parts.append(f"the request body: {e.get('msg')}")
    return "; ".join(parts) or "invalid request", param


# ----------------------------------------------------------------------------------------------- checks


def nearest_multiples(v: int, m: int = 8) -> str:
    lo = max(m, v // m * m)
    return f"{lo}" if lo == v or lo + m == v else f"{lo} or {lo + m}"


def check_size(width: int, height: int, limits: Limits, param: str) -> None:
    for name, v in (("width", width), ("height", height)):
        if v < 8:
            raise bad(f"{param}: {name} {v} is too small; use a multiple of 8, at least 8", param)
        if v % 8:
            raise bad(f"{param}: {name} {v} is not a multiple of 8; use {nearest_multiples(v)}", param)
    if width > limits.max_width or height > limits.max_height:
        raise bad(f"{param} {width}x{height} is larger than this server's limit {limits.max_width}x{limits.max_height} "
                  "(--max-size)", param)


def parse_size(size: str | None, default: tuple[int, int], limits: Limits, param: str = "size") -> tuple[int, int]:
    """OpenAI's "WxH" (or "auto", None: the model's native size) -> (width, height), checked."""
    if size is None or size == "auto":
        return default
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise bad(f"size must be 'WIDTHxHEIGHT' (e.g. '{default[0]}x{default[1]}') or 'auto', got {size!r}", param) from None
    check_size(w, h, limits, param)
    return w, h


def check_count(n: int, limits: Limits, param: str, what: str) -> None:
    if n < 1:
        raise bad(f"{what} must be at least 1, got {n}", param)
    if n > limits.max_images:
        raise bad(f"{what} {n} is more images than this server's limit of {limits.max_images} a request (--max-images)", param)


def check_steps(steps: int, limits: Limits, param: str) -> None:
    if steps < 1:
        raise bad(f"{param} must be at least 1, got {steps}", param)
    if steps > limits.max_steps:
        raise bad(f"{param} {steps} is more than this server's limit of {limits.max_steps} (--max-steps)", param)


def check_guidance(g: float, param: str) -> None:
    if not math.isfinite(g):
        raise bad(f"{param} must be a finite number, got {g!r}", param)


def check_strength(s: float | None, param: str) -> None:
    if s is not None and not 0.0 < s <= 1.0:
        raise bad(f"{param} must be in (0, 1], got {s!r}", param)


def check_scheduler(name: str | None, param: str = "scheduler") -> None:
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    if name is not None and name not in SCHEDULER_NAMES:
        raise bad(f"{param} {name!r} is not one sdrt has; use one of {', '.join(SCHEDULER_NAMES)}", param)


def check_prompt_syntax(name: str | None) -> None:
    from sdrt.runtime.prompts import SYNTAXES

    if name is not None and name not in SYNTAXES:
        raise bad(f"prompt_syntax {name!r} is not one sdrt reads; use one of {', '.join(SYNTAXES)}", "prompt_syntax")


def random_seed() -> int:
    return secrets.randbelow(2**32)


# ----------------------------------------------------------------------------------------------- images


def decode_image(data: bytes | str, param: str):
    """PNG/JPEG/WebP bytes, or base64 text (a data: URL prefix allowed, as AUTOMATIC1111 takes) -> PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as e:
            raise bad(f"{param} is not base64 image data ({e})", param) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise bad(f"{param} is not an image PIL can read ({e})", param) from None


def encode_image(image, fmt: str = "png", text: dict | None = None) -> str:
    """A PIL image -> base64 text of the file (PNG with ``text`` in tEXt chunks)."""
    buf = io.BytesIO()
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in (text or {}).items():
            info.add_text(k, v)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        image.save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}[fmt], quality=95)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------- waiting


async def run_job(request: Request, job: Job, poll: float = 0.1) -> Result:
    """Queue ``job`` and wait for it; a client that disconnects has its job dropped before its next step."""
    from sdrt.runtime.errors import GenerationError, SdrtError

    service = request.app.state.service
    try:
        fut = service.submit(job)
    except Overloaded as e:
        raise ApiError(503, str(e), kind="overloaded", headers={"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), kind="shutting_down", headers={"Retry-After": "5"}) from None
    waiting = asyncio.wrap_future(fut)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even when nobody awaits
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=poll)
        if done:
            break
        if await request.is_disconnected():
            job.cancel()
            raise ApiError(499, "the client disconnected; the request was dropped", kind="dropped")
    try:
        result = waiting.result()
    except GenerationError as e:
        raise bad(str(e)) from None
    except Dropped as e:
        raise ApiError(499, str(e), kind="dropped") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), kind="shutting_down", headers={"Retry-After": "5"}) from None
    except SdrtError as e:  # NaN out of an engine, a component that cannot run
        raise ApiError(500, str(e), kind="server_error") from None
    except Exception as e:  # noqa: BLE001
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error") from None
    return result
