"""One benchmark contender in its own process: ``python -m sdrt.benchmarks.worker SPEC.json``.

The parent (sdrt.benchmarks.bench) writes SPEC.json: the contender (``kind`` sdrt or diffusers), the model
directory or checkpoint, the generation settings, the path of the initial latents (.npy, drawn by the parent)
and where to write the result (JSON) and the image (.npy, float32 (B, H, W, 3) in [0, 1]).

The worker imports, loads, runs ``warmup`` untimed and ``runs`` timed generations, and prints the line
``SDRT_BENCH_FIRST_IMAGE`` (flushed) the moment its first image exists, so the parent can time the cold start
from just before it spawned the process. At the end it records its peak host RSS, its peak GPU memory (NVML,
sampled) and which of torch / diffusers / transformers / sdrt.export are in ``sys.modules`` (an sdrt worker
must have none of them).

This module imports only the standard library and numpy at the top: the sdrt contender must stay torch-free.

``python -m sdrt.benchmarks.worker --matmul cuda OUT.json`` measures the GPU's fp32 / fp16 matmul throughput
with torch (the roofline on a GPU).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

T_START = time.perf_counter()

import numpy as np  # noqa: E402

FIRST_IMAGE_MARKER = "SDRT_BENCH_FIRST_IMAGE"
FORBIDDEN_IN_SDRT = ("torch", "diffusers", "transformers", "sdrt.export")


class Skip(Exception):
    """This contender cannot run here; the message says why."""


# -- memory ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far.

    On Linux this is VmHWM from /proc/self/status, the high-water mark of this process's own address space:
    getrusage's ru_maxrss would not do, as it carries over the parent's RSS at the fork before exec."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except ImportError:
            return None


class GpuMemorySampler:
    """Samples NVML in a thread: this process's GPU memory (per-process accounting), or where the driver
    does not report processes (containers), the device's used memory above what was in use at the start."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.method, self.error = interval, None, None, None
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                raise RuntimeError("no NVIDIA device")
            self._nvml = pynvml
            index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0] or 0)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._baseline = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception as e:  # no pynvml, no driver, no GPU
            self._nvml, self.error = None, f"{type(e).__name__}: {e}"

    def _sample(self):
        nv, pid = self._nvml, os.getpid()
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            procs = []
        mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        if mine:
            self.method = "nvml-process"
            return int(sum(mine))
        if self.method == "nvml-process":
            return None
        self.method = "nvml-device-minus-baseline"
        return int(max(0, nv.nvmlDeviceGetMemoryInfo(self._handle).used - self._baseline))

    def _loop(self):
        while not self._stop.is_set():
            try:
                v = self._sample()
                if v is not None:
                    self.peak = v if self.peak is None else max(self.peak, v)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
            self._stop.wait(self.interval)

    def start(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample_once_more()
        return {"peak_gpu_bytes": self.peak, "gpu_memory_method": self.method, "nvml_error": self.error}

    def _sample_once_more(self):
        try:
            v = self._sample()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
        except Exception:
            pass


# -- contenders -----------------------------------------------------------------------------------------


def _mark_first_image():
    print(FIRST_IMAGE_MARKER, time.time(), flush=True)


def run_sdrt(spec: dict) -> dict:
    import inspect

    from sdrt.runtime.backends import BackendUnavailable, cache_states
    from sdrt.runtime.pipeline import Pipeline

    t_import = time.perf_counter()
    kwargs = {"backend": spec["backend"]}
    if spec.get("precision", "fp32") != "fp32":
        kwargs["precision"] = spec["precision"]
    if spec.get("threads"):
        kwargs["threads"] = spec["threads"]
    if spec.get("low_memory"):
        if "low_memory" not in inspect.signature(Pipeline.load).parameters:
            raise Skip("low_memory is unsupported: this sdrt's Pipeline.load has no low_memory keyword")
        kwargs["low_memory"] = True
    try:
        pipe = Pipeline.load(spec["model"], **kwargs)
    except BackendUnavailable as e:
        raise Skip(str(e)) from e
    t_load = time.perf_counter()
    latents = np.load(spec["latents"])
    call = dict(
        prompt=spec["prompt"], negative_prompt=spec.get("negative_prompt"), num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
        num_images_per_prompt=spec["batch"], seed=spec["seed"], latents=latents, scheduler=spec.get("scheduler"),
        output_type="np",
    )
    runs, image, first_s, caches = [], None, None, {}
    for i in range(spec["warmup"] + spec["runs"]):
        t0 = time.perf_counter()
        out = pipe(**call)
        t1 = time.perf_counter()
        if i == 0:
            first_s = t1 - t0
            _mark_first_image()
            caches = cache_states(pipe.engines)  # what the cold start found in the engine caches, or filled
        if i >= spec["warmup"]:
            t = out.timings
            runs.append({"end_to_end": t1 - t0, "tokenize": t.tokenize, "text_encoder": t.text_encoder,
                         "unet": [float(x) for x in t.unet], "vae_decoder": t.vae_decoder,
                         "scheduler": t.scheduler})
            if image is None:
                image = np.asarray(out.images, dtype=np.float32)
    unet_rec = pipe.manifest["components"]["unet"]
    return {
        "backend": pipe.backend, "device": "cpu" if pipe.backend in ("ort-cpu", "openvino") else "gpu",
        "precision": spec.get("precision") if spec.get("precision", "fp32") != "fp32" else unet_rec.get("precision", "fp32"),
        "low_memory": bool(spec.get("low_memory")),
        "import_s": t_import - T_START, "load_s": t_load - t_import, "first_call_s": first_s,
        "engine_cache": caches, "runs": runs, "image": image,
    }


def _patch_randn(gen_holder: list):
    """diffusers draws stochastic-scheduler noise with randn_tensor: draw it from the same numpy Generator (seeded
    as sdrt seeds its own) in call order, so both sides see the same noise."""
    import torch

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        sample = torch.from_numpy(gen_holder[0].standard_normal(tuple(shape), dtype=np.float32))
        return sample.to(device=device or "cpu", dtype=dtype or torch.float32)

    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and module is not None and callable(vars(module).get("randn_tensor")):
            setattr(module, "randn_tensor", randn_tensor)


def _diffusers_scheduler(pipe, name):
    import diffusers

    from sdrt.runtime.schedulers import diffusers_equivalent

    class_name, implied = diffusers_equivalent(name)
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **implied)


def run_diffusers(spec: dict) -> dict:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*__array__ implementation.*")
    import torch
    import diffusers
    from pathlib import Path

    t_import = time.perf_counter()
    want = spec.get("device", "auto")
    cuda = torch.cuda.is_available()
    if spec.get("compile") and not cuda:
        raise Skip("torch.compile is benchmarked on a GPU only, and torch sees no CUDA GPU here")
    if want == "cuda" and not cuda:
        raise Skip("--diffusers-device cuda, but torch sees no CUDA GPU here")
    device = "cuda" if (cuda and want != "cpu") else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    ckpt = Path(spec["checkpoint"])
    if (ckpt / "text_encoder_2").is_dir():
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ckpt, torch_dtype=dtype, add_watermarker=False,
                                                                   local_files_only=True)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(ckpt, torch_dtype=dtype, safety_checker=None,
                                                                 requires_safety_checker=False, local_files_only=True)
    if spec.get("scheduler"):
        pipe.scheduler = _diffusers_scheduler(pipe, spec["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device == "cuda":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    if spec.get("compile"):
        pipe.unet = torch.compile(pipe.unet)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stages: dict[str, list] = {"text_encoder": [], "unet": [], "vae_decoder": []}

    def hook_module(module, stage):
        starts = []

        def pre(_m, _args):
            sync()
            starts.append(time.perf_counter())

        def post(_m, _args, _out):
            sync()
            stages[stage].append(time.perf_counter() - starts.pop())

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hook_module(pipe.text_encoder, "text_encoder")
    if getattr(pipe, "text_encoder_2", None) is not None:
        hook_module(pipe.text_encoder_2, "text_encoder")
    hook_module(pipe.unet, "unet")  # the module the pipeline calls (the compiled wrapper under torch.compile)
    decode = pipe.vae.decode

    def timed_decode(*a, **k):
        sync()
        t0 = time.perf_counter()
        r = decode(*a, **k)
        sync()
        stages["vae_decoder"].append(time.perf_counter() - t0)
        return r

    pipe.vae.decode = timed_decode
    gen = [None]
    _patch_randn(gen)
    t_load = time.perf_counter()

    latents = torch.from_numpy(np.load(spec["latents"])).to(device=device, dtype=dtype)
    def before():
        gen[0] = np.random.default_rng(spec["seed"])
        sync()

    runs, image, first_s = _timed_runs(pipe, spec, latents, stages, before=before, after=sync)
    extra = {}
    if device == "cuda":
        extra["torch_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        extra["torch_cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return {
        "backend": "torch.compile" if spec.get("compile") else "torch", "device": "gpu" if device == "cuda" else "cpu",
        "precision": "fp16" if dtype == torch.float16 else "fp32", "attention": "sdpa" if device == "cuda" else "default",
        "torch_threads": torch.get_num_threads(), "import_s": t_import - T_START, "load_s": t_load - t_import,
        "first_call_s": first_s, "runs": runs, "image": image, **extra,
    }


# -- optimum-intel (its own virtual environment: nothing of sdrt is importable there) -------------------


def optimum_export(checkpoint: str, out: str) -> None:
    """The checkpoint as optimum-intel's OpenVINO IR pipeline (what `optimum-cli export openvino` writes)."""
    from optimum.intel import OVStableDiffusionPipeline

    OVStableDiffusionPipeline.from_pretrained(checkpoint, export=True, compile=False).save_pretrained(out)


def run_optimum(spec: dict) -> dict:
    """OVStableDiffusionPipeline at its defaults (OpenVINO's own hints: bf16 where the CPU has it, dynamic shapes)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import diffusers
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    t_import = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["ov_model"])
    if spec.get("diffusers_scheduler"):
        cls, implied = spec["diffusers_scheduler"]
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **implied)
    pipe.set_progress_bar_config(disable=True)
    stages: dict[str, list] = {"text_encoder": [], "unet": [], "vae_decoder": []}
    for stage in stages:
        part = getattr(pipe, stage, None)
        if part is None or not hasattr(part, "forward"):
            continue

        def timed(*a, _f=part.forward, _s=stage, **k):
            t0 = time.perf_counter()
            r = _f(*a, **k)
            stages[_s].append(time.perf_counter() - t0)
            return r

        part.forward = timed
    t_load = time.perf_counter()
    latents = torch.from_numpy(np.load(spec["latents"]))
    runs, image, first_s = _timed_runs(pipe, spec, latents, stages)
    precision = "unknown"
    try:
        hint = str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")).lower()  # "<Type: 'bfloat16'>"
        precision = "bf16" if "bf" in hint else "fp32" if "32" in hint else "fp16" if "16" in hint else hint
    except Exception:
        pass
    import importlib.metadata as md

    return {
        "backend": "openvino (optimum-intel)", "device": "cpu", "precision": precision,
        "versions": {d: md.version(d) for d in ("optimum-intel", "openvino", "diffusers", "transformers", "torch")},
        "import_s": t_import - T_START, "load_s": t_load - t_import, "first_call_s": first_s, "runs": runs,
        "image": image,
    }


def _timed_runs(pipe, spec: dict, latents, stages: dict, before=lambda: None, after=lambda: None):
    """A diffusers-style pipeline's warm-up and timed runs of the spec's call: (runs with per-stage seconds from
    ``stages``' hooks, the first timed image, the first call's seconds). ``before`` runs before the clock starts (the
    noise source reset, a device sync), ``after`` before it stops (a device sync)."""
    call = dict(
        prompt=spec["prompt"], negative_prompt=spec.get("negative_prompt"), num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
        num_images_per_prompt=spec["batch"], latents=latents, output_type="np",
    )
    runs, image, first_s = [], None, None
    for i in range(spec["warmup"] + spec["runs"]):
        for v in stages.values():
            v.clear()
        before()
        t0 = time.perf_counter()
        out = pipe(**call)
        after()
        t1 = time.perf_counter()
        if i == 0:
            first_s = t1 - t0
            _mark_first_image()
        if i >= spec["warmup"]:
            runs.append({"end_to_end": t1 - t0, "text_encoder": float(sum(stages["text_encoder"])),
                         "unet": [float(x) for x in stages["unet"]], "vae_decoder": float(sum(stages["vae_decoder"]))})
            if image is None:
                image = np.asarray(out.images, dtype=np.float32)
    return runs, image, first_s


# -- GPU matmul roofline --------------------------------------------------------------------------------


def gpu_matmul(sizes=(2048, 4096, 8192), repeats: int = 5) -> dict:
    """Best-of-N torch matmul throughput on the GPU, fp32 (TF32 off) and fp16."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for name, dtype in (("gpu_fp32", torch.float32), ("gpu_fp16", torch.float16)):
        per_size = {}
        for n in sizes:
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            torch.matmul(a, b)
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(a, b)
                end.record()
                torch.cuda.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            per_size[str(n)] = 2 * n**3 / best
            del a, b
        out[name] = {"flops_per_s": max(per_size.values()), "by_size": per_size,
                     "library": f"torch {torch.__version__} matmul (cuBLAS{', TF32 off' if dtype == torch.float32 else ''})",
                     "method": f"best of {repeats}, square sizes {list(sizes)}"}
    out["gpu_name"] = torch.cuda.get_device_name(0)
    return out


# -- entry ----------------------------------------------------------------------------------------------


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--optimum-export":
        optimum_export(argv[1], argv[2])
        return 0
    if argv and argv[0] == "--matmul":
        out_path = argv[2]
        try:
            _write_json(out_path, {"status": "ok", **gpu_matmul()})
        except Skip as e:
            _write_json(out_path, {"status": "skipped", "reason": str(e)})
        except Exception as e:
            traceback.print_exc()
            _write_json(out_path, {"status": "failed", "reason": f"{type(e).__name__}: {e}"})
        return 0
    if len(argv) != 1:
        print("usage: python -m sdrt.benchmarks.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(open(argv[0], encoding="utf-8").read())
    sampler = GpuMemorySampler().start() if spec.get("gpu_memory", True) else None
    result: dict = {"contender": spec["contender"], "kind": spec["kind"], "pid": os.getpid()}
    try:
        run = {"sdrt": run_sdrt, "optimum-intel": run_optimum}.get(spec["kind"], run_diffusers)
        body = run(spec)
        image = body.pop("image")
        np.save(spec["image_out"], image)
        result.update(status="ok", image=spec["image_out"], **body)
    except Skip as e:
        result.update(status="skipped", reason=str(e))
    except Exception as e:
        traceback.print_exc()
        result.update(status="failed", reason=f"{type(e).__name__}: {e}")
    result["peak_rss_bytes"] = peak_rss_bytes()
    result.update(sampler.stop() if sampler else {"peak_gpu_bytes": None})
    result["forbidden_modules_loaded"] = [m for m in FORBIDDEN_IN_SDRT if m in sys.modules]
    result["torch_imported"] = "torch" in sys.modules
    result["worker_s"] = time.perf_counter() - T_START
    _write_json(spec["result_out"], result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
