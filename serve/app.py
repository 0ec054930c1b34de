"""The FastAPI app: both APIs' routes, /health and /metrics, the API key, errors as JSON, request metrics.

    app = create_app(ServeConfig(model="engines/sd1", api_key="KEY"))   # uvicorn, or Ray Serve's ingress

The app's lifespan starts the Service (one Pipeline per worker) and drains it on shutdown, so the same
app serves under uvicorn (``sdrt serve``) and on each Ray Serve replica (``sdrt serve --ray``).
"""

from __future__ import annotations

import base64
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import a1111_api, openai_api
from .common import ApiError, Limits, error_body, validation_message
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .service import Service

OPEN_PATHS = ("/health",)  # answered without the API key


@dataclass
class ServeConfig:
    """``sdrt serve``'s options."""

    model: str | None = None  # None: the built-in default model
    api_key: str | None = None
    max_queue: int = 32
    max_batch: int = 4
    workers: int = 1
    backend: str = "auto"
    limits: Limits = field(default_factory=Limits)

    def model_dir(self) -> Path:
        if self.model is not None:
            return Path(self.model)
        from sdrt.runtime.default_model import default_model_dir

        path = default_model_dir()
        if path is None:
            raise ValueError("no --model given and no built-in default model is installed; pass --model DIR")
        return path


def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    """The app for ``config``; ``service`` (already started) is used instead of starting one."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = service is None
        svc = service or Service(config.model_dir(), workers=config.workers, max_queue=config.max_queue,
                                 max_batch=config.max_batch, backend=config.backend, metrics=metrics)
        if own:
            await run_in_threadpool(svc.start)
        app.state.service = svc
        try:
            yield
        finally:
            if own:
                await run_in_threadpool(svc.close)

    app = FastAPI(title="sdrt", description="Stable Diffusion over HTTP: OpenAI Images API and AUTOMATIC1111's API",
                  lifespan=lifespan, dependencies=[Depends(_authorize)])
    app.state.config, app.state.limits, app.state.metrics = config, config.limits, metrics
    app.state.model_name = config.model_dir().name
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)

    @app.get("/health")
    async def health(request: Request):
        svc = request.app.state.service
        status = "shutting_down" if svc.closing else "ok"
        return JSONResponse({"status": status, "model": request.app.state.model_name, "queued": svc.queued},
                            status_code=503 if svc.closing else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        request.state.error_kind = e.kind
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        request.state.error_kind = "server_error"
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type_="server_error"),
                            status_code=500)

    app.add_middleware(_BodyLimit, limit=config.limits.max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics)  # outermost: it also counts what _BodyLimit refuses
    return app


def _authorize(request: Request) -> None:
    """``Authorization: Bearer KEY`` (what OpenAI clients send), or HTTP Basic with KEY as the password (what
    AUTOMATIC1111 clients send for the webui's --api-auth: ``webuiapi.WebUIApi(username=..., password=KEY)``)."""
    key = request.app.state.config.api_key
    if key is None or request.url.path in OPEN_PATHS:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    given = None
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = None
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        what = "no API key was given" if not header else "the API key is not valid"
        raise ApiError(401, f"{what}; send 'Authorization: Bearer KEY' with this server's --api-key", kind="unauthorized",
                       headers={"WWW-Authenticate": "Bearer"})


_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "not_found", 413: "bad_request",
          422: "bad_request", 499: "dropped", 503: "overloaded", 500: "server_error"}


def _too_large(size: str, limit: int) -> str:
    return (f"the request body is {size}, more than this server's limit of {limit / 2**20:g} MiB (--max-body-mib); "
            "send smaller images")


class _BodyLimit:
    """413 for a body over ``limit`` bytes, before it is read into memory: at once when its Content-Length says
    so, else (a chunked body) as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = error_body(_too_large(f"{int(declared) / 2**20:.1f} MiB", self.limit))
            return await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # raised inside the route's body read: answered by http_error
                    raise HTTPException(413, _too_large(f"over {self.limit / 2**20:g} MiB", self.limit))
            return message

        await self.app(scope, limited_receive, send)


class _Observe:
    """ASGI wrapper counting every answer by route template and status, and timing it (pure ASGI, not
    BaseHTTPMiddleware, so that a route still sees its client disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            m, code = self.metrics, status[0]
            m.requests.labels(path, str(code)).inc()
            m.latency.labels(path).observe(time.perf_counter() - t0)
            if code >= 400:
                kind = scope.get("state", {}).get("error_kind") or _KINDS.get(code, "bad_request" if code < 500 else "server_error")
                m.errors.labels(path, kind).inc()
