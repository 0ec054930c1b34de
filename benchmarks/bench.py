"""``sdrt bench``: sdrt against the PyTorch (diffusers) baseline, latency and memory side by side in one run.

    sdrt bench --workload sd1                      # seconds: a smoke test of the harness, not a measurement
    sdrt bench --workload sd1-full --out engines/bench/report-sd1-full
    sdrt bench --checkpoint path/to/diffusers-checkpoint --height 512 --width 512 --steps 25 \
        --contenders sdrt-ort-cpu,diffusers --runs 5 --json bench.json --out bench-report

Every contender runs in its own process (``python -m sdrt.benchmarks.worker``), so its peak memory is its own,
on the same initial latents (drawn here with numpy from --seed), prompt and settings: warm-up runs, then timed
runs. Reported per contender: end-to-end latency (median, p90, min), per-stage latency (text encoder, UNet per
step, VAE decode), cold start (from just before the process is spawned to its first image, with the files it
reads already in the page cache and an sdrt contender's engine caches already filled, as a second launch finds
them: ``--page-cache as-is`` to time the disk too, ``--engine-cache as-is`` to time the filling),
peak host RSS, peak GPU memory (NVML), and the max abs pixel difference of its image against diffusers'. A
contender whose image differs by more than the tolerance is flagged and not ranked. The UNet's FLOPs are counted
from the ONNX graph and set against this machine's measured matmul throughput (the roofline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

from . import report as report_mod
from .stats import ratio, summarize

SDRT_BACKENDS = {"sdrt-ort-cpu": "ort-cpu", "sdrt-ort-cuda": "ort-cuda", "sdrt-tensorrt": "tensorrt",
                 "sdrt-openvino": "openvino", "sdrt-openvino-bf16": "openvino", "sdrt-openvino-int8": "openvino",
                 "sdrt-ort-cpu-int8": "ort-cpu"}
# contender -> precision (Pipeline.load's); the others run fp32
SDRT_PRECISIONS = {"sdrt-openvino-bf16": "bf16", "sdrt-openvino-int8": "int8", "sdrt-ort-cpu-int8": "int8"}
DIFFUSERS_CONTENDERS = ("diffusers", "diffusers-compile")
OPTIMUM_INTEL = "optimum-intel"  # optimum-intel's OVStableDiffusionPipeline at its defaults, in its own venv
LOWMEM_SUFFIX = "-lowmem"
DEFAULT_CONTENDERS = ("sdrt-ort-cpu", "sdrt-ort-cpu-int8", "sdrt-openvino", "sdrt-openvino-bf16", "sdrt-openvino-int8",
                      "sdrt-ort-cuda", "sdrt-tensorrt", "diffusers", "diffusers-compile", OPTIMUM_INTEL)
REFERENCE = "diffusers"
TOLERANCE = 2e-3
PROMPT = "a photograph of an astronaut riding a horse on the moon"
FIRST_IMAGE_MARKER = "SDRT_BENCH_FIRST_IMAGE"

# --workload NAME: the test checkpoint family and the settings it implies (explicit options win)
WORKLOADS = {
    "sd1": dict(family="sd1", height=64, width=64, steps=4, runs=2, warmup=1),
    "sd1-full": dict(family="sd1-full", height=256, width=256, scheduler="dpm++2m", steps=10, guidance=7.5, batch=1,
                     runs=3, warmup=1),
}
DEFAULTS = dict(steps=20, guidance=7.5, batch=1, seed=0, runs=3, warmup=1, scheduler=None, height=None, width=None)


class BenchError(SdrtError, RuntimeError):
    """The benchmark cannot run as asked; the message says why and what to do."""


# -- arguments ------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--workload", choices=sorted(WORKLOADS),
                   help="build the test checkpoint of that name (cached) and use its settings: sd1 (64x64, 4 steps, "
                        "a smoke test), sd1-full (real SD 1.5 sizes, 256x256, dpm++2m, 10 steps)")
    p.add_argument("--checkpoint", help="diffusers checkpoint folder (the diffusers contenders run it; the sdrt "
                                        "model directory is exported from it unless --model is given)")
    p.add_argument("--model", help="sdrt model directory exported from --checkpoint (default: exported into the cache)")
    p.add_argument("--cache-dir", default="engines/bench",
                   help="where test checkpoints and exports are cached (default engines/bench)")
    p.add_argument("--contenders", help="comma list of " + ", ".join(DEFAULT_CONTENDERS) + " and sdrt-*"
                   + LOWMEM_SUFFIX + " (default: all; those that cannot run here are reported as skipped)")
    p.add_argument("--low-memory", action="store_true",
                   help="also run each sdrt contender with Pipeline.load(..., low_memory=True), as sdrt-*-lowmem")
    p.add_argument("--height", type=int, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width (default: the model's native size)")
    p.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULTS['steps']})")
    p.add_argument("--scheduler", help="scheduler name (default: the checkpoint's own)")
    p.add_argument("--guidance", type=float, help=f"guidance scale (default {DEFAULTS['guidance']})")
    p.add_argument("--batch", type=int, help="images per call (default 1)")
    p.add_argument("--seed", type=int, help="seed of the initial latents (and of stochastic schedulers' noise)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--negative-prompt")
    p.add_argument("--runs", type=int, help=f"timed runs per contender (default {DEFAULTS['runs']})")
    p.add_argument("--warmup", type=int, help=f"untimed warm-up runs per contender (default {DEFAULTS['warmup']})")
    p.add_argument("--threads", type=int,
                   help="intra-op threads for every contender (ONNX Runtime and torch; default: each library's own)")
    p.add_argument("--diffusers-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the diffusers contenders run (auto: fp16 on a GPU when torch sees one, else fp32 CPU)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"max abs pixel difference against diffusers' image for a contender to count as matching "
                        f"(default {TOLERANCE})")
    p.add_argument("--page-cache", choices=("warm", "as-is"), default="warm",
                   help="warm (default): read each contender's files (its model or checkpoint, the packages it imports) "
                        "just before it starts, so that every cold start finds them in the page cache; as-is: leave the "
                        "page cache as the previous contenders left it (cold starts then include disk reads)")
    p.add_argument("--engine-cache", choices=("warm", "as-is"), default="warm",
                   help="warm (default): before each sdrt contender, one short run of it (1 step, the same size) fills "
                        "its engine caches where they are missing (ONNX Runtime's optimized graphs, OpenVINO's compiled "
                        "models), so its cold start is a second launch's; as-is: its first process fills them, and its "
                        "cold start includes that")
    p.add_argument("--timeout", type=float, help="seconds a contender may take before it is stopped and reported failed")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--out", help="folder for the markdown report (bench.md) and the chart (bench.png)")
    p.add_argument("--roofline-sizes", default="512,1024,2048",
                   help="square sizes of the numpy sgemm measurement (default 512,1024,2048)")
    p.add_argument("--no-roofline", action="store_true", help="skip the matmul measurement and the FLOP count")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="sdrt bench", description=__doc__.split("\n")[0]))


def settings_from_args(args) -> dict:
    base = dict(DEFAULTS)
    if args.workload:
        base.update({k: v for k, v in WORKLOADS[args.workload].items() if k != "family"})
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else base.get(k)) for k in DEFAULTS}
    s.update(prompt=args.prompt, negative_prompt=args.negative_prompt, threads=args.threads,
             diffusers_device=args.diffusers_device, tolerance=args.tolerance, workload=args.workload,
             page_cache=getattr(args, "page_cache", "warm"), engine_cache=getattr(args, "engine_cache", "warm"))
    for k in ("steps", "batch", "runs"):
        if s[k] < 1:
            raise BenchError(f"--{k} must be at least 1, got {s[k]}")
    if s["warmup"] < 0:
        raise BenchError(f"--warmup must be 0 or more, got {s['warmup']}")
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    if s["scheduler"] is not None and s["scheduler"] not in SCHEDULER_NAMES:
        raise BenchError(f"unknown scheduler {s['scheduler']!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    for k in ("height", "width"):
        if s[k] is not None and (s[k] <= 0 or s[k] % 8):
            raise BenchError(f"--{k} must be a positive multiple of 8, got {s[k]}")
    return s


def parse_contenders(text: str | None, low_memory: bool) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(DEFAULT_CONTENDERS)
    known = set(DEFAULT_CONTENDERS) | {n + LOWMEM_SUFFIX for n in SDRT_BACKENDS}
    bad = [n for n in names if n not in known]
    if bad:
        raise BenchError(f"unknown contender(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")
    if low_memory:
        out = []
        for n in names:
            out.append(n)
            if n in SDRT_BACKENDS and n + LOWMEM_SUFFIX not in names:
                out.append(n + LOWMEM_SUFFIX)
        names = out
    return list(dict.fromkeys(names))


# -- inputs: checkpoint, model directory, latents -------------------------------------------------------


def _run_logged(cmd: list[str], what: str, log) -> None:
    log(f"{what}: {' '.join(cmd)}")
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode:
        raise BenchError(f"{what} failed (exit code {r.returncode}): {' '.join(cmd)}")


def workload_checkpoint(workload: str, cache: Path, log) -> Path:
    """The test checkpoint of a workload, built with `python -m sdrt.export.testing` on first use."""
    family = WORKLOADS[workload]["family"]
    path = (cache / "checkpoints" / family).absolute()
    if (path / "model_index.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{family}.", dir=path.parent))
    try:
        _run_logged([sys.executable, "-m", "sdrt.export.testing", family, str(work)], f"building the {family} test checkpoint", log)
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _export_source(model_dir: Path) -> Path | None:
    try:
        src = json.loads((model_dir / "sdrt.json").read_text(encoding="utf-8"))["source"]["checkpoint"]
        return Path(src).resolve()
    except (OSError, KeyError, TypeError, ValueError):
        return None


def export_dir_for(checkpoint: Path, cache: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    return (cache / f"{checkpoint.resolve().name}-{key}").absolute()


def ensure_model(checkpoint: Path, cache: Path, log) -> Path:
    """The cached sdrt export of ``checkpoint``: reused when its manifest's source is this checkpoint, else
    (re-)exported with `sdrt export` in a child process (torch stays out of this one)."""
    out = export_dir_for(checkpoint, cache)
    if _export_source(out) == checkpoint.resolve():
        log(f"reusing the export {out} (its manifest's source is {checkpoint})")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_logged([sys.executable, "-m", "sdrt", "export", str(checkpoint.resolve()), "--out", str(out), "--overwrite"],
                "exporting", log)
    return out


def draw_latents(seed: int, shape: tuple) -> np.ndarray:
    """The initial noise every contender starts from: what sdrt itself draws for this seed."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# -- availability ---------------------------------------------------------------------------------------


def _have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skip_reason(name: str, machine: dict, settings: dict, checkpoint: Path | None, manifest: dict) -> str | None:
    """Why ``name`` cannot run here, or None when it should be tried."""
    has_gpu = bool(machine.get("gpus"))
    no_gpu = machine.get("no_gpu_reason") or "no NVIDIA GPU"
    base = name[: -len(LOWMEM_SUFFIX)] if name.endswith(LOWMEM_SUFFIX) else name
    if SDRT_BACKENDS.get(base) == "openvino" and not _have("openvino"):
        return "OpenVINO is not installed (pip install 'sdrt[openvino]')"
    precision = SDRT_PRECISIONS.get(base, "fp32")
    if precision == "int8" and not (manifest["components"].get("unet", {}).get("variants") or {}).get("int8"):
        return f"the model directory has no int8 UNet; make one with `sdrt quantize {settings.get('model')}`"
    if precision != "fp32":
        from sdrt.runtime.errors import ConfigError
        from sdrt.runtime.precision import check

        try:
            check(SDRT_BACKENDS[base], precision)
        except ConfigError as e:
            return str(e)
        variant = (manifest["components"]["unet"].get("variants") or {}).get("int8") or {}
        if precision == "int8" and variant.get("format") == "openvino" and SDRT_BACKENDS[base] != "openvino":
            return "the model's int8 UNet is an OpenVINO IR (sdrt quantize --method nncf): openvino only"
    if name == OPTIMUM_INTEL:
        if checkpoint is None:
            return "no --checkpoint given: optimum-intel exports the diffusers checkpoint itself"
    if name.endswith(LOWMEM_SUFFIX):
        import inspect

        from sdrt.runtime.pipeline import Pipeline

        if "low_memory" not in inspect.signature(Pipeline.load).parameters:
            return "low_memory is unsupported: this sdrt's Pipeline.load has no low_memory keyword"
    if base == "sdrt-ort-cuda":
        if "CUDAExecutionProvider" not in machine.get("onnxruntime_providers", []):
            return "ONNX Runtime has no CUDA provider here (pip install 'sdrt[gpu]' for onnxruntime-gpu)"
        if not has_gpu:
            return f"no GPU: {no_gpu}"
    if base == "sdrt-tensorrt":
        if not has_gpu:
            return f"no GPU: {no_gpu}"
        if not _have("tensorrt"):
            return "tensorrt is not installed (pip install 'sdrt[tensorrt]')"
        if not manifest.get("engines"):
            return "the model directory has no TensorRT engines; build them with `sdrt build`"
    if name in DIFFUSERS_CONTENDERS:
        if not (_have("torch") and _have("diffusers")):
            return "torch and diffusers are not installed (pip install 'sdrt[export]')"
        if checkpoint is None:
            return "no --checkpoint given: diffusers runs the diffusers checkpoint the model was exported from"
        if name == "diffusers-compile":
            if not has_gpu:
                return f"torch.compile is benchmarked on a GPU only, and there is none: {no_gpu}"
            if settings["diffusers_device"] == "cpu":
                return "--diffusers-device cpu: torch.compile is benchmarked on a GPU only"
        if name == "diffusers" and settings["diffusers_device"] == "cuda" and not has_gpu:
            return f"--diffusers-device cuda: {no_gpu}"
    return None


# -- running one contender ------------------------------------------------------------------------------

# the packages each kind of contender imports (sdrt's workers import one of the two engines)
IMPORTS = {"sdrt": ("sdrt", "numpy", "tokenizers", "onnxruntime", "openvino"),
           "diffusers": ("torch", "diffusers", "transformers", "safetensors", "tokenizers", "numpy")}


def contender_files(spec: dict, python: str | None = None) -> list[Path]:
    """The files and folders a contender's process reads from start to first image: its model (the sdrt model
    directory's files for its backend and precision, the diffusers checkpoint, optimum-intel's IR) and the packages
    it imports (for a contender in its own virtual environment, that environment's lib folder)."""
    import importlib.util

    kind = spec["kind"]
    data = {"sdrt": spec.get("model"), "optimum-intel": spec.get("ov_model")}.get(kind, spec.get("checkpoint"))
    if not data:
        paths = []
    elif kind == "sdrt":
        paths = _sdrt_files(Path(data), spec.get("backend") or "", spec.get("precision") or "fp32")
    else:
        paths = [Path(data)]
    if python:
        paths.append(Path(python).parent.parent / "lib")
    else:
        for module in IMPORTS.get(kind, IMPORTS["diffusers"]):
            found = importlib.util.find_spec(module)
            if found is not None and found.submodule_search_locations:
                paths.extend(Path(p) for p in found.submodule_search_locations)
    return paths


def _sdrt_files(model: Path, backend: str, precision: str) -> list[Path]:
    """The files of an sdrt model directory that a contender may read: not the other backends' cache entries,
    nor another precision's graphs (a model directory with every variant and cache is 12 GB here, and reading
    it all would push the contender's own files out of the page cache)."""
    from sdrt.runtime.backends.base import is_cache_entry_of

    out = []
    for f in sorted(model.rglob("*")):
        rel = f.relative_to(model).parts
        if not f.is_file() or f.is_symlink():
            continue
        if rel[0] == "cache" and len(rel) > 2 and not is_cache_entry_of(rel[1], backend):
            continue
        if ".int8." in f.name and precision != "int8":
            continue
        out.append(f)
    return out


def warm_page_cache(paths, chunk: int = 16 << 20) -> dict:
    """Read every file under ``paths`` once, so that the next process finds them in the page cache: cold starts
    then compare processes, not whichever contender the disk or the previous contenders favoured (a 4 GB
    checkpoint read from a cold disk here took 60 to 190 s). Unreadable files are skipped."""
    t0, files, size = time.perf_counter(), 0, 0
    buf = bytearray(chunk)
    for root in paths:
        root = Path(root)
        for f in [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        size += n
            except OSError:
                continue
            files += 1
    return {"files": files, "mib": size / 2**20, "seconds": time.perf_counter() - t0}


def fill_engine_caches(spec: dict, work: Path, timeout: float | None, log) -> dict | None:
    """Run the sdrt contender of ``spec`` once, for one step at its size, in a process of its own: it fills the
    engine caches that are missing (an OpenVINO model is compiled per shape), so that the timed process's cold
    start is a second launch's. {"engine_cache": {component: state}, "seconds": s}, None where it failed (the
    timed process then reports why)."""
    prep = dict(spec, contender=f"{spec['contender']}.prepare", steps=1, warmup=0, runs=1,
                image_out=str(work / f"{spec['contender']}.prepare.npy"),
                result_out=str(work / f"{spec['contender']}.prepare.json"))
    t0 = time.perf_counter()
    res = run_worker(prep, work, timeout, log)
    if res.get("status") != "ok":
        return None
    return {"engine_cache": res.get("engine_cache") or {}, "seconds": time.perf_counter() - t0}


def _states(states: dict) -> str:
    """{component: cache state} as "filled: unet, vae_decoder; hit: text_encoder"."""
    by: dict = {}
    for component, state in states.items():
        by.setdefault(state, []).append(component)
    return "; ".join(f"{state}: {', '.join(names)}" for state, names in sorted(by.items())) or "none kept"


def run_worker(spec: dict, work: Path, timeout: float | None, log, python: str | None = None) -> dict:
    """Spawn the worker for ``spec``; returns its result with cold_start_s (spawn to first image) added.
    ``python``: another interpreter (a contender's own virtual environment), which runs worker.py by path."""
    name = spec["contender"]
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    stderr_path = work / f"{name}.stderr.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = ([python, str(Path(__file__).with_name("worker.py")), str(spec_path)] if python
           else [sys.executable, "-m", "sdrt.benchmarks.worker", str(spec_path)])
    first_image = None
    with open(stderr_path, "wb") as err:
        t_spawn = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1)
        timer = None
        if timeout:
            import threading

            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        try:
            for line in proc.stdout:
                if first_image is None and line.startswith(FIRST_IMAGE_MARKER):
                    first_image = time.perf_counter()
                elif line.strip():
                    log(f"  [{name}] {line.rstrip()}")
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result_path = Path(spec["result_out"])
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    else:
        tail = stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        why = "timed out" if timeout and rc in (-9, 137) else f"exit code {rc}"
        result = {"contender": name, "status": "failed", "reason": f"the worker died ({why}): " + " | ".join(tail)}
    result["returncode"] = rc
    result["cold_start_s"] = (first_image - t_spawn) if first_image is not None else None
    if result.get("status") == "failed":
        result["stderr_tail"] = stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        log(f"  [{name}] failed: {result.get('reason')}")
        for line in result["stderr_tail"]:
            log(f"  [{name}] {line}")
    return result


def metrics(result: dict, unet_flops: float | None, peaks: dict) -> dict:
    """Per-stage statistics of a worker's timed runs, and the UNet's achieved FLOP/s."""
    runs = result.get("runs") or []
    unet_calls = [x for r in runs for x in r["unet"]]
    per_run = {
        "end_to_end": [r["end_to_end"] for r in runs],
        "text_encoder": [r["text_encoder"] for r in runs],
        "unet_total": [sum(r["unet"]) for r in runs],
        "vae_decoder": [r["vae_decoder"] for r in runs],
        "other": [max(0.0, r["end_to_end"] - r["text_encoder"] - sum(r["unet"]) - r["vae_decoder"]) for r in runs],
    }
    lat = {k: summarize(v) for k, v in per_run.items()}
    lat["unet_step"] = summarize(unet_calls)
    out = {"latency_s": lat, "unet_calls_per_run": len(runs[0]["unet"]) if runs else 0}
    if unet_flops and lat["unet_step"]:
        achieved = unet_flops / lat["unet_step"]["median"]
        key = f"{'gpu' if result.get('device') == 'gpu' else 'cpu'}_{result.get('precision', 'fp32')}"
        entry = peaks.get(key) or {}
        peak = entry.get("flops_per_s") if entry.get("status") == "ok" else None
        out["roofline"] = {"unet_flops_per_call": unet_flops, "achieved_flops_per_s": achieved, "peak_key": key,
                           "peak_flops_per_s": peak, "fraction_of_peak": ratio(achieved, peak)}
    return out


# -- the run --------------------------------------------------------------------------------------------


def run(args, log=None) -> dict:
    """Run the benchmark described by parsed ``args``; returns the report (also written where asked)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    settings = settings_from_args(args)
    names = parse_contenders(args.contenders, args.low_memory)
    cache = Path(args.cache_dir)

    checkpoint = Path(args.checkpoint).absolute() if args.checkpoint else None
    if args.workload and checkpoint is None:
        checkpoint = workload_checkpoint(args.workload, cache, log)
    if checkpoint is not None and not (checkpoint / "model_index.json").is_file():
        raise BenchError(f"{checkpoint} is not a diffusers checkpoint folder (no model_index.json)")
    if args.model:
        model = Path(args.model).absolute()
        if not (model / "sdrt.json").is_file():
            raise BenchError(f"{model} is not an sdrt model directory (no sdrt.json); export one with `sdrt export`")
    elif checkpoint is not None:
        model = ensure_model(checkpoint, cache, log)
    else:
        raise BenchError("give --checkpoint DIR (a diffusers checkpoint), --model DIR, or --workload sd1|sd1-full")
    manifest = json.loads((model / "sdrt.json").read_text(encoding="utf-8"))
    if checkpoint is not None and args.model:
        src = _export_source(model)
        if src is not None and src != checkpoint.resolve():
            log(f"note: {model} was exported from {src}, not from {checkpoint}; images may not match")

    native, f = manifest["native_resolution"], manifest["vae_scale_factor"]
    settings["height"] = settings["height"] or native
    settings["width"] = settings["width"] or native
    settings.update(checkpoint=str(checkpoint) if checkpoint else None, model=str(model), contenders=names,
                    low_memory=bool(args.low_memory) or any(n.endswith(LOWMEM_SUFFIX) for n in names))
    shape = (settings["batch"], manifest["latent_channels"], settings["height"] // f, settings["width"] // f)

    from .machine import cpu_roofline, machine_facts

    machine = machine_facts()
    report: dict = {"format": "sdrt-bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings": settings, "machine": machine, "reference": REFERENCE}

    work = Path(tempfile.mkdtemp(prefix="sdrt-bench-"))
    try:
        lat_path = work / "latents.npy"
        np.save(lat_path, draw_latents(settings["seed"], shape))
        settings["latent_shape"] = list(shape)

        # roofline: the UNet's FLOPs from its graph, this machine's matmul throughput
        roof: dict = {}
        unet_flops = None
        if not args.no_roofline:
            from .flops import unet_flops as count_unet

            try:
                roof["unet"] = count_unet(model, manifest, batch=settings["batch"], height=settings["height"],
                                          width=settings["width"], guidance=settings["guidance"] > 1.0)
                unet_flops = roof["unet"]["flops"]
            except Exception as e:  # a graph shape inference cannot follow: report, do not fail the run
                roof["unet"] = {"error": f"{type(e).__name__}: {e}"}
            sizes = [int(s) for s in str(args.roofline_sizes).split(",") if s.strip()]
            log(f"measuring numpy sgemm throughput at {sizes}")
            roof["cpu_fp32"] = cpu_roofline(sizes, settings["threads"])
            if machine.get("gpus") and _have("torch"):
                roof.update(_gpu_roofline(work, log))
        report["roofline"] = roof

        contenders: dict = {}
        for name in names:
            why = skip_reason(name, machine, settings, checkpoint, manifest)
            if why:
                log(f"{name}: skipped ({why})")
                contenders[name] = {"status": "skipped", "reason": why}
                continue
            base = name[: -len(LOWMEM_SUFFIX)] if name.endswith(LOWMEM_SUFFIX) else name
            kind = "sdrt" if base in SDRT_BACKENDS else "optimum-intel" if name == OPTIMUM_INTEL else "diffusers"
            spec = {
                "contender": name, "kind": kind, "precision": SDRT_PRECISIONS.get(base, "fp32"),
                "backend": SDRT_BACKENDS.get(base), "low_memory": name.endswith(LOWMEM_SUFFIX),
                "compile": name == "diffusers-compile", "device": settings["diffusers_device"],
                "model": str(model), "checkpoint": str(checkpoint) if checkpoint else None, "latents": str(lat_path),
                "prompt": settings["prompt"], "negative_prompt": settings["negative_prompt"],
                "steps": settings["steps"], "guidance": settings["guidance"], "height": settings["height"],
                "width": settings["width"], "batch": settings["batch"], "seed": settings["seed"],
                "scheduler": settings["scheduler"], "runs": settings["runs"], "warmup": settings["warmup"],
                "threads": settings["threads"], "gpu_memory": bool(machine.get("gpus")),
                "image_out": str(work / f"{name}.image.npy"), "result_out": str(work / f"{name}.result.json"),
            }
            python = None
            if kind == "optimum-intel":
                from .optimum_intel import prepare

                try:
                    python, spec["ov_model"] = prepare(checkpoint, cache, log)
                except BenchError as e:
                    log(f"{name}: skipped ({e})")
                    contenders[name] = {"status": "skipped", "reason": str(e)}
                    continue
                if settings["scheduler"]:
                    from sdrt.runtime.schedulers import diffusers_equivalent

                    spec["diffusers_scheduler"] = list(diffusers_equivalent(settings["scheduler"]))
            if kind == "sdrt" and settings["engine_cache"] == "warm":
                prepared = fill_engine_caches(spec, work, args.timeout, log)
                if prepared is not None:
                    log(f"{name}: engine caches before its cold start: {_states(prepared['engine_cache'])} (a 1-step "
                        f"run, {prepared['seconds']:.1f} s)")
            warmed = None
            if settings["page_cache"] == "warm":
                warmed = warm_page_cache(contender_files(spec, python))
                log(f"{name}: page cache warmed ({warmed['mib']:.0f} MiB in {warmed['files']} files, {warmed['seconds']:.1f} s)")
            log(f"{name}: {settings['warmup']} warm-up + {settings['runs']} timed runs")
            res = run_worker(spec, work, args.timeout, log, python=python)
            if warmed is not None:
                res["page_cache_warmed"] = warmed
            if res.get("status") == "ok":
                res.update(metrics(res, unet_flops, roof))
                res["image_array"] = np.load(res.pop("image"))
            elif res.get("status") == "skipped":
                log(f"{name}: skipped ({res.get('reason')})")
            contenders[name] = res

        _compare_images(contenders, settings["tolerance"])
        report["contenders"] = contenders
        report["ratios"] = report_mod.ratios(report)
        report["summary"] = report_mod.summary_lines(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        md_path, png_path = out / "bench.md", out / "bench.png"
        chart_error = report_mod.write_chart(report, png_path)
        report["outputs"] = {"markdown": str(md_path), "chart": None if chart_error else str(png_path),
                             "chart_error": chart_error}
        md_path.write_text(report_mod.markdown(report), encoding="utf-8")
    if args.json:
        Path(args.json).absolute().parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return report


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _gpu_roofline(work: Path, log) -> dict:
    out_path = work / "matmul.json"
    log("measuring GPU matmul throughput (torch, fp32 and fp16)")
    subprocess.run([sys.executable, "-m", "sdrt.benchmarks.worker", "--matmul", "cuda", str(out_path)],
                   stdout=sys.stderr, stderr=sys.stderr)
    try:
        r = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"gpu_fp32": {"status": "failed", "reason": "the matmul worker wrote no result"}}
    if r.get("status") != "ok":
        return {"gpu_fp32": {"status": r.get("status"), "reason": r.get("reason")}}
    return {"gpu_fp32": {"status": "ok", **r["gpu_fp32"]}, "gpu_fp16": {"status": "ok", **r["gpu_fp16"]}}


def _compare_images(contenders: dict, tol: float) -> None:
    """Max abs pixel difference of each contender's image against the reference's; flags mismatches.
    The arrays are dropped from the results afterwards (the report keeps numbers only)."""
    ref = contenders.get(REFERENCE, {})
    ref_img = ref.get("image_array") if ref.get("status") == "ok" else None
    for name, res in contenders.items():
        if res.get("status") != "ok":
            continue
        img = res.get("image_array")
        if ref_img is None:
            res.update(image_max_abs_diff=None, image_matches=None,
                       image_note=f"not verified: no {REFERENCE} image to compare with")
        elif img is None or img.shape != ref_img.shape:
            res.update(image_max_abs_diff=None, image_matches=False,
                       image_note=f"image shape {None if img is None else img.shape} differs from {REFERENCE}'s {ref_img.shape}")
        else:
            d = float(np.max(np.abs(img.astype(np.float64) - ref_img.astype(np.float64))))
            res.update(image_max_abs_diff=d, image_matches=bool(d <= tol) and bool(np.isfinite(d)))
            if not res["image_matches"]:
                res["image_note"] = f"image mismatch: max abs diff {d:.3g} > {tol:g} against {REFERENCE}; not ranked"
        res["image_tolerance"] = tol
        res["image_reference_precision"] = ref.get("precision") if ref_img is not None else None
    _psnr(contenders)
    for res in contenders.values():
        res.pop("image_array", None)


REDUCED = ("bf16", "int8", "fp16")


def psnr_db(img: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio of ``img`` against ``ref`` (both in [0, 1]), in dB."""
    mse = float(np.mean((img.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _psnr(contenders: dict) -> None:
    """Every contender's PSNR against the fp32 image (diffusers', else sdrt's own fp32 one). A reduced precision
    (bf16, int8; optimum-intel at OpenVINO's defaults) is measured by it, not held to the parity tolerance."""
    refs = [n for n in (REFERENCE, "sdrt-ort-cpu", "sdrt-openvino") if contenders.get(n, {}).get("status") == "ok"
            and contenders[n].get("image_array") is not None and contenders[n].get("precision") == "fp32"]
    if not refs:
        return
    ref_name, ref_img = refs[0], contenders[refs[0]]["image_array"]
    for name, res in contenders.items():
        img = res.get("image_array")
        if res.get("status") != "ok" or img is None or img.shape != ref_img.shape:
            continue
        res["image_psnr_db"], res["image_psnr_reference"] = psnr_db(img, ref_img), ref_name
        if res.get("precision") in REDUCED or name == OPTIMUM_INTEL:
            res["image_matches"] = None  # not a parity contender: PSNR says how far it is
            res["image_note"] = (f"{res.get('precision')}: PSNR {res['image_psnr_db']:.1f} dB against {ref_name}'s "
                                 f"fp32 image (max abs diff {res.get('image_max_abs_diff') or 0:.3g}); not held to "
                                 "the parity tolerance")
            if name == OPTIMUM_INTEL:  # measured on sd1-full: with the f32 hint its image is as far (20.6 dB)
                res["image_note"] += ("; its own export (fp16-saved weights) and pipeline, so the PSNR measures "
                                      "their difference from diffusers' as well as its precision")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except BenchError as e:
        print(f"sdrt bench: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report["summary"]))
    return exit_code(report)


def exit_code(report: dict) -> int:
    """1 when a contender that should have run failed (the report is written all the same), else 0."""
    failed = [n for n, r in report["contenders"].items() if r.get("status") == "failed"]
    if failed:
        print(f"sdrt bench: {len(failed)} contender(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
