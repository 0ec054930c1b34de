"""Facts about this machine for the benchmark report, and its matrix-multiply throughput (the roofline).

Nothing here imports torch: library versions are read from the installed distributions' metadata, and the
GPU's matmul throughput is measured by a worker process (``python -m sdrt.benchmarks.worker --matmul``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers", "tensorrt",
             "openvino", "nncf")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def gpus() -> tuple[list[dict], str | None]:
    """([{name, memory_bytes, driver}], why none) from NVML."""
    try:
        import pynvml
    except ImportError:
        have_driver = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()
        return [], ("nvidia-ml-py is not installed (pip install 'sdrt[bench]')" if have_driver else "no NVIDIA GPU")
    try:
        pynvml.nvmlInit()
    except Exception:
        return [], "NVML finds no NVIDIA driver or GPU"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"name": name.decode() if isinstance(name, bytes) else name,
                        "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total), "driver": driver})
        return out, (None if out else "no NVIDIA GPU")
    finally:
        pynvml.nvmlShutdown()


def numpy_blas() -> str:
    import numpy as np

    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown BLAS"


def machine_facts() -> dict:
    from sdrt import __version__
    from sdrt.runtime.backends.onnxruntime import physical_cores
    from sdrt.runtime.precision import cpu_flags, isa

    gpu_list, no_gpu = gpus()
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": physical_cores(),
        # what decides CPU speed at each precision; the flags themselves, those of them this CPU has
        "cpu_isa": isa(),
        "cpu_isa_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                               "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": total_memory_bytes(),
        "gpus": gpu_list,
        "gpu": gpu_list[0]["name"] if gpu_list else None,
        "no_gpu_reason": no_gpu,
        "onnxruntime_providers": providers,
        "numpy_blas": numpy_blas(),
        "versions": {"sdrt": __version__, **{lib: _version(lib) for lib in LIBRARIES}},
    }


def numpy_matmul(sizes=(512, 1024, 2048), repeats: int = 3, budget_s: float = 20.0) -> dict:
    """Best-of-N numpy float32 matmul (sgemm) throughput on the CPU, with numpy's own BLAS and thread count."""
    import numpy as np

    rng = np.random.default_rng(0)
    per_size = {}
    t_start = time.perf_counter()
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        a @ b  # warm-up: BLAS thread pool, page faults
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        per_size[str(n)] = 2 * n**3 / best
        if time.perf_counter() - t_start > budget_s:
            break
    return {"flops_per_s": max(per_size.values()), "by_size": per_size,
            "library": f"numpy {np.__version__} matmul ({numpy_blas()}, float32 sgemm)",
            "method": f"best of {repeats}, square sizes {[int(s) for s in per_size]}"}


def cpu_roofline(sizes, threads: int | None = None) -> dict:
    """numpy_matmul in a fresh process, with BLAS limited to ``threads`` (the contenders' thread count) when
    given; {"status": "ok", ...} or {"status": "failed", "reason": ...}."""
    import json
    import subprocess

    env = dict(os.environ)
    if threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, "-m", "sdrt.benchmarks.machine", "--matmul", ",".join(str(int(n)) for n in sizes)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        return {"status": "failed", "reason": f"the matmul measurement failed (exit code {r.returncode}): {tail}"}
    return {"status": "ok", **out, "threads": threads or "numpy default"}


if __name__ == "__main__":
    import json

    if len(sys.argv) == 3 and sys.argv[1] == "--matmul":
        print(json.dumps(numpy_matmul([int(n) for n in sys.argv[2].split(",")])))
    else:
        print(json.dumps(machine_facts(), indent=2))
