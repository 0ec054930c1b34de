"""``sdrt serve``: its options, and running the app under uvicorn (or on Ray Serve with ``--ray``).

SIGTERM (and Ctrl-C) stop it gracefully: requests being generated finish and are answered, queued ones get
503, and the process exits 0. This module imports only the standard library at the top, so that the CLI's
parser is built without the ``[serve]`` extra installed.
"""

from __future__ import annotations

import argparse
import signal

SERVE_EXTRA = "`sdrt serve` needs the serve extra: pip install 'sdrt[serve]'"
RAY_EXTRA = "`sdrt serve --ray` needs Ray Serve: pip install 'sdrt[ray]'"


class ServeError(Exception):
    """A one-line error for the CLI."""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 8")
    return w, h


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="sdrt model directory (default: the built-in default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, AUTOMATIC1111's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-queue", type=_positive, default=32, help="requests that may wait; more get 503 (default 32)")
    p.add_argument("--max-batch", type=_positive, default=4,
                   help="most images queued requests share in one UNet batch (default 4; 1: no batching)")
    p.add_argument("--max-images", type=_positive, default=8, help="most images a request may ask for (default 8)")
    p.add_argument("--max-size", type=_size, default=(1024, 1024), metavar="WxH",
                   help="largest width x height a request may ask for (default 1024x1024)")
    p.add_argument("--max-steps", type=_positive, default=150, help="most denoising steps a request may ask for (default 150)")
    p.add_argument("--max-body-mib", type=_positive, default=64,
                   help="largest request body in MiB (images in base64 or multipart); larger ones get 413 (default 64)")
    p.add_argument("--workers", type=_positive, default=1, help="worker threads, each with its own pipeline (default 1)")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda or tensorrt (default auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info: one line a request)")
    r = p.add_argument_group("Ray Serve (--ray; needs pip install 'sdrt[ray]')")
    r.add_argument("--ray", action="store_true", help="deploy on Ray Serve replicas instead of one uvicorn process")
    r.add_argument("--replicas", type=_positive, default=1, help="replicas, each with one pipeline (default 1)")
    r.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    r.add_argument("--autoscaling", type=_range, metavar="MIN:MAX",
                   help="let Ray Serve scale between MIN and MAX replicas instead of --replicas")
    r.add_argument("--autoscaling-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another key of Ray Serve's autoscaling_config (e.g. target_ongoing_requests=2); repeatable")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves for each replica (default 0)")


def config_from(args):
    from .app import ServeConfig
    from .common import Limits

    limits = Limits(max_images=args.max_images, max_width=args.max_size[0], max_height=args.max_size[1],
                    max_steps=args.max_steps, max_body_bytes=args.max_body_mib << 20)
    return ServeConfig(model=args.model, api_key=args.api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                       workers=args.workers, backend=args.backend, limits=limits)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError(SERVE_EXTRA) from None
    config = config_from(args)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(config, args)
    return run_uvicorn(config, args.host, args.port, log_level=args.log_level)


def run_uvicorn(config, host: str, port: int, log_level: str = "info") -> int:
    """Load the pipelines (a model that cannot load is a one-line error), then serve until SIGTERM/Ctrl-C."""
    import uvicorn

    from sdrt.runtime.errors import SdrtError

    from .app import create_app
    from .service import Service

    try:
        service = Service(config.model_dir(), workers=config.workers, max_queue=config.max_queue,
                          max_batch=config.max_batch, backend=config.backend)
        app = create_app(config, service)
        service.metrics = app.state.metrics
        service.start()
    except (SdrtError, ValueError) as e:
        raise ServeError(str(e)) from e

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.drain()  # queued requests: 503 now; running ones finish before uvicorn closes their connection
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    # uvicorn raises the signal it caught again once it has shut down; a handled SIGTERM then exits 0
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close()
    if not server.started:
        raise ServeError(f"could not serve on {host}:{port} (see the log above)")
    return 0


def _stopped(sig, frame) -> None:
    """SIGTERM after uvicorn's graceful shutdown: nothing left to do."""
