"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds (Linux)
        self.requests = Counter("sdrt_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("sdrt_request_seconds", "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "Time a generation waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("sdrt_generation_seconds", "Time of one Pipeline call (a batch)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("sdrt_batch_images", "Images per Pipeline call",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.images = Counter("sdrt_images_generated", "Images generated and sent", ["route"], registry=r)
        self.errors = Counter("sdrt_errors", "Requests that failed, by route and kind (bad_request, unauthorized, "
                              "overloaded, shutting_down, dropped, server_error)", ["route", "kind"], registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "Generations waiting in the queue", registry=r)
        self.running = Gauge("sdrt_running", "Generations in a Pipeline call now", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
