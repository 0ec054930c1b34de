"""``sdrt serve --ray``: the same FastAPI app on Ray Serve replicas, each holding one pipeline.

Ray Serve's documented pattern (``@serve.deployment`` over ``@serve.ingress(app)``), with the app given as a
builder so that each replica builds its own app, whose lifespan loads that replica's pipeline:

    deploy(config, replicas=2)               # a local Ray cluster unless ray.init(address=...) ran first
    serve.status().applications["sdrt"]      # the deployment "SdrtServer" with 2 RUNNING replicas
"""

from __future__ import annotations

import time

APP_NAME = "sdrt"
DEPLOYMENT_NAME = "SdrtServer"


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def autoscaling_config(bounds: tuple[int, int], options: list[str] | None = None) -> dict:
    """``--autoscaling MIN:MAX`` and ``--autoscaling-option KEY=VALUE`` -> Ray Serve's autoscaling_config."""
    lo, hi = bounds
    config = {"min_replicas": lo, "max_replicas": hi}
    for option in options or ():
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--autoscaling-option {option!r} is not KEY=VALUE (e.g. target_ongoing_requests=2)")
        config[key.strip()] = _number(value.strip())
    return config


def deploy(config, *, replicas: int = 1, autoscaling: dict | None = None, host: str = "127.0.0.1",
           port: int = 8000, replica_cpus: float = 1.0, replica_gpus: float = 0.0):
    """Deploy the app as the Serve application ``sdrt`` at route prefix "/" and return its handle."""
    from ray import serve

    from .app import create_app

    def build_app():  # runs on each replica: its own app, its own Service and pipeline
        return create_app(config)

    options = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        # the replica's own bounded queue answers overload (503 + Retry-After); let requests reach it
        "max_ongoing_requests": config.max_queue + config.max_batch * max(1, config.workers),
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas

    class SdrtServer:
        """One replica: the app built by build_app (routes, queue, one pipeline per worker)."""

    deployment = serve.deployment(**options)(serve.ingress(build_app)(SdrtServer))
    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")


def run_ray(config, args) -> int:
    """``sdrt serve --ray``: start (or join) a cluster, deploy, and wait until SIGTERM/Ctrl-C."""
    import signal

    from .server import RAY_EXTRA, ServeError

    try:
        import ray
        from ray import serve
    except ImportError:
        raise ServeError(RAY_EXTRA) from None
    try:
        autoscaling = autoscaling_config(args.autoscaling, args.autoscaling_option) if args.autoscaling else None
    except ValueError as e:
        raise ServeError(str(e)) from e
    config.model = str(config.model_dir().absolute())  # replicas may run elsewhere: no relative paths
    ray.init(address=args.ray_address)  # with its dashboard, which `serve status` asks
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        deploy(config, replicas=args.replicas, autoscaling=autoscaling, host=args.host, port=args.port,
               replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus)
        print(f"sdrt serve: {APP_NAME} on Ray Serve at http://{args.host}:{args.port}, "
              + (f"autoscaling {autoscaling}" if autoscaling else f"{args.replicas} replica(s)") + "; Ctrl-C stops it",
              flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if not args.ray_address:
            serve.shutdown()
            ray.shutdown()
    return 0
