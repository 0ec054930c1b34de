"""The generation service behind every route: a bounded queue of jobs, worker threads that each hold one
Pipeline, and batching of queued jobs that can share a UNet batch.

    service = Service(model_dir, max_queue=32, max_batch=4)
    service.start()
    images = service.submit(Job("a red circle", seeds=[(0, 1)], steps=20, ...)).result()

A job's images are the same whether it runs alone or batched with others: text-to-image jobs with a
deterministic scheduler draw their initial noise per job (``numpy.random.default_rng(seed)``, as
``Pipeline(seed=...)`` does) and go to the Pipeline as one call with a list of prompts and ``latents=``;
only jobs with the same size, steps, guidance, scheduler, prompt syntax and prompt chunk counts share a
call. Everything else (image to image, inpainting, stochastic schedulers, whose noise the Pipeline draws
from one generator per call) runs alone, one Pipeline call per seed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Overloaded(Exception):
    """The queue is full: answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping: queued and new jobs are answered 503."""


class Dropped(Exception):
    """The client went away: the job stopped before its next step."""


@dataclass
class Job:
    """One request's generation: ``seeds`` is a list of (seed, images) chunks, each drawn as
    ``Pipeline(seed=seed, num_images_per_prompt=images)`` draws it. Sizes, steps and guidance are resolved
    (no None) by the routes, so that batching compares real values."""

    prompt: str
    seeds: list[tuple[int, int]]
    steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the checkpoint's own
    image: object = None  # PIL image: image to image (with mask: inpainting)
    mask: object = None
    strength: float | None = None
    prompt_syntax: str | None = None
    future: Future = field(default_factory=Future, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    enqueued: float = field(default_factory=time.monotonic, repr=False)
    key: object = field(default=False, repr=False)  # batch key, computed once (False: not yet)

    @property
    def n_images(self) -> int:
        return sum(count for _, count in self.seeds)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Result:
    images: list  # PIL images, in the order of the job's seeds
    scheduler: str  # the scheduler that ran (sdrt's name)
    batch_images: int  # images in the Pipeline call(s) this job shared
    seconds: float  # generation time (the whole call it shared)


class Service:
    """``workers`` threads, each with its own Pipeline of ``model_dir``; at most ``max_queue`` jobs wait;
    up to ``max_batch`` images share one Pipeline call. ``metrics`` (serve.metrics.Metrics) is optional."""

    def __init__(self, model_dir: str | Path, *, workers: int = 1, max_queue: int = 32, max_batch: int = 4,
                 backend: str = "auto", metrics=None):
        self.model_dir = Path(model_dir)
        self.workers, self.max_queue, self.max_batch, self.backend = workers, max_queue, max_batch, backend
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._running = 0  # jobs in a Pipeline call now
        self._seconds_per_image = None  # moving average, for Retry-After
        self.progress = {"step": 0, "steps": 0, "jobs": 0, "started": None}
        self.pipe = None  # the first worker's pipeline: manifest, defaults, tokenizers for the routes

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> "Service":
        """Load one pipeline per worker (the first here, so that a model that cannot load fails now)."""
        from sdrt.runtime.pipeline import Pipeline

        pipes = [Pipeline.load(self.model_dir, backend=self.backend) for _ in range(self.workers)]
        self.pipe = pipes[0]
        for i, pipe in enumerate(pipes):
            t = threading.Thread(target=self._work, args=(pipe,), name=f"sdrt-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.metrics is not None:
            self.metrics.queue_depth.set_function(lambda: len(self._queue))
            self.metrics.running.set_function(lambda: self._running)
        return self

    def drain(self) -> None:
        """Stop taking jobs: queued ones fail with ShuttingDown, running ones finish."""
        with self._cond:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            _fail(job, ShuttingDown("the server is shutting down; retry on another instance"))

    def close(self, timeout: float | None = None) -> None:
        """drain(), then wait for the workers to finish what they run."""
        self.drain()
        for t in self._threads:
            t.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------------------------------- defaults

    @property
    def manifest(self) -> dict:
        return self.pipe.manifest

    def defaults(self) -> dict:
        """What a request that gives no steps, guidance, size or scheduler gets."""
        from sdrt.runtime.pipeline import DEFAULT_STEPS
        from sdrt.runtime.schedulers import make_scheduler

        pipe = self.pipe
        size = pipe.manifest["native_resolution"]
        return {
            "steps": pipe.generation_defaults.get("num_inference_steps", DEFAULT_STEPS),
            "guidance": float(pipe.generation_defaults.get("guidance_scale", pipe.family.default_guidance)),
            "width": size,
            "height": size,
            "scheduler": make_scheduler(None, pipe.scheduler_config).name,
        }

    # ------------------------------------------------------------------------------------------- queue

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets a Result, or the error. Raises Overloaded or ShuttingDown."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests waiting, --max-queue); retry later",
                                 self.retry_after())
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one batch per worker."""
        per_image = self._seconds_per_image or 1.0
        waiting = sum(j.n_images for j in self._queue) + self.max_batch
        return max(1, math.ceil(per_image * waiting / (self.workers * self.max_batch)))

    def _next_group(self, pipe) -> list[Job] | None:
        """The oldest job and the queued jobs that can share its Pipeline call (None: stop)."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            group = [first]
            key = self._key(pipe, first)
            if key is not None:
                images = first.n_images
                for job in list(self._queue):
                    if images + job.n_images > self.max_batch:
                        continue
                    if self._key(pipe, job) == key:
                        self._queue.remove(job)
                        group.append(job)
                        images += job.n_images
            self._running += len(group)
        if self.metrics is not None:
            now = time.monotonic()
            for job in group:
                self.metrics.queue_wait.observe(now - job.enqueued)
        return group

    def _key(self, pipe, job: Job):
        if job.key is False:
            try:
                job.key = batch_key(pipe, job)
            except Exception:  # noqa: BLE001  (the job's own run reports what is wrong with it)
                job.key = None
        return job.key

    # ------------------------------------------------------------------------------------------- worker

    def _work(self, pipe) -> None:
        while True:
            group = self._next_group(pipe)
            if group is None:
                return
            try:
                self._run(pipe, group)
            except BaseException as e:  # noqa: BLE001  a failing request never takes the worker down
                for job in group:
                    _fail(job, e)
            finally:
                with self._cond:
                    self._running -= len(group)

    def _run(self, pipe, group: list[Job]) -> None:
        live = []
        for job in group:
            if job.cancelled.is_set():
                _fail(job, Dropped("the client disconnected"))
            else:
                live.append(job)
        if not live:
            return
        n_images = sum(j.n_images for j in live)

        def callback(step, steps):
            self.progress.update(step=step, steps=steps)
            if all(j.cancelled.is_set() for j in live):
                raise Dropped("the client disconnected")

        self.progress.update(step=0, steps=live[0].steps, jobs=len(live), started=time.time())
        t0 = time.perf_counter()
        try:
            if live[0].key is not None:
                images, scheduler = run_batched(pipe, live, callback)
            else:
                images, scheduler = run_alone(pipe, live[0], callback, lambda: live[0].cancelled.is_set())
                images = [images]
        finally:
            self.progress.update(step=0, steps=0, jobs=0, started=None)
        seconds = time.perf_counter() - t0
        per_image = seconds / max(1, n_images)
        self._seconds_per_image = per_image if self._seconds_per_image is None else \
            0.8 * self._seconds_per_image + 0.2 * per_image
        if self.metrics is not None:
            self.metrics.batch_images.observe(n_images)
            self.metrics.generation_seconds.observe(seconds)
        for job, ims in zip(live, images):
            if job.cancelled.is_set():
                _fail(job, Dropped("the client disconnected"))
            elif not job.future.done():
                job.future.set_result(Result(ims, scheduler, n_images, seconds))


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)


# ----------------------------------------------------------------------------------------------- pipeline calls


def batch_key(pipe, job: Job):
    """What a job's Pipeline call must agree on with another's to share it; None when it can share with no
    other (an init image, or a scheduler that draws fresh noise at some step)."""
    from sdrt.runtime import prompts
    from sdrt.runtime.schedulers import make_scheduler

    if job.image is not None or job.mask is not None:
        return None
    sched = make_scheduler(job.scheduler, pipe.scheduler_config)
    sched.set_timesteps(job.steps)
    if any(sched.needs_noise(i) for i in range(len(sched.timesteps))):
        return None
    syntax = prompts.syntax_name(job.prompt_syntax)

    def chunks(text):  # 77-token chunks a prompt takes: the batch pads every prompt to the longest
        if text is None or syntax == "none":
            return 1 if text is not None else None
        return prompts.tokenize([text], syntax, pipe.tokenizers).plans[0][0].ids.shape[0]

    return (job.width, job.height, job.steps, job.guidance, sched.name, syntax, chunks(job.prompt),
            chunks(job.negative_prompt))


def job_noise(pipe, job: Job) -> np.ndarray:
    """The job's initial noise, (n, C, H/8, W/8): per (seed, count) chunk what ``Pipeline(seed=seed,
    num_images_per_prompt=count)`` draws first for text to image."""
    m = pipe.manifest
    f = m["vae_scale_factor"]
    shape = (m["latent_channels"], job.height // f, job.width // f)
    return np.concatenate([np.random.default_rng(seed).standard_normal((count,) + shape, dtype=np.float32)
                           for seed, count in job.seeds])


def run_batched(pipe, jobs: list[Job], callback) -> tuple[list[list], str]:
    """Text to image for jobs of one batch key in one Pipeline call: their prompts as a list, their noise
    as ``latents``. Returns the images per job, and the scheduler's name."""
    first = jobs[0]
    prompts, negatives = [], []
    for job in jobs:
        prompts += [job.prompt] * job.n_images
        negatives += [job.negative_prompt] * job.n_images
    out = pipe(prompts, negative_prompt=None if first.negative_prompt is None else negatives,
               num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height,
               width=first.width, latents=np.concatenate([job_noise(pipe, j) for j in jobs]),
               scheduler=first.scheduler, callback=callback, prompt_syntax=first.prompt_syntax)
    images, at = [], 0
    for job in jobs:
        images.append(out.images[at:at + job.n_images])
        at += job.n_images
    return images, out.parameters["scheduler"]


def run_alone(pipe, job: Job, callback, cancelled) -> tuple[list, str]:
    """One Pipeline call per (seed, count) chunk, as ``sdrt generate --seed S --num-images N``."""
    images, scheduler = [], job.scheduler
    for seed, count in job.seeds:
        if cancelled():
            raise Dropped("the client disconnected")
        out = pipe(job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                   guidance_scale=job.guidance, height=job.height, width=job.width, num_images_per_prompt=count,
                   seed=seed, scheduler=job.scheduler, image=job.image, mask_image=job.mask, strength=job.strength,
                   callback=callback, prompt_syntax=job.prompt_syntax)
        images += out.images
        scheduler = out.parameters["scheduler"]
    return images, scheduler
