"""VAE decoding: time and peak memory of one model directory's VAE decoder, whole or tiled.

    python -m sdrt.benchmarks.vae --model DIR --size 1024 [--tiling] [--runs 3] [--warmup 1] [--json OUT]
    python -m sdrt.benchmarks.vae --model DIR --size 1024 --compare-tiling
    python -m sdrt.benchmarks.vae --model SD15_DIR --model TAESD_DIR --size 512

Each measurement (one model, tiled or not) runs in its own process, one after another, so its peak RSS
is its own: the process opens the vae_decoder engine alone (ONNX Runtime on the CPU, as ``Pipeline.load``
would), decodes random (1, C, size/8, size/8) latents through ``runtime/vae.py``'s decode (what
``Pipeline.__call__`` runs, ``enable_vae_tiling()`` or not), ``--warmup`` untimed then ``--runs`` timed,
and reports the median decode time, the RSS after opening the engine and the peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(model: str, size: int, tiling: bool, runs: int, warmup: int, threads: int | None) -> dict:
    """In this process: open the model's VAE decoder, decode ``warmup + runs`` times, report."""
    import numpy as np

    from sdrt.runtime.backends.onnxruntime import OrtEngine
    from sdrt.runtime.manifest import load_manifest
    from sdrt.runtime.vae import Vae

    root = Path(model)
    manifest = load_manifest(root)
    rec = manifest["components"]["vae_decoder"]
    t0 = time.perf_counter()
    engine = OrtEngine("vae_decoder", root, rec, provider="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mib()
    vae = Vae.from_manifest(manifest)
    f = manifest["vae_scale_factor"]
    latents = np.random.default_rng(0).standard_normal((1, manifest["latent_channels"], size // f, size // f),
                                                       dtype=np.float32)
    names = rec["inputs"][0]["name"], rec["outputs"][0]["name"]
    calls = []

    def run(z):
        calls.append(z.shape[-2:])
        return engine(**{names[0]: z})[names[1]]

    times = []
    for i in range(warmup + runs):
        calls.clear()
        t = time.perf_counter()
        image = vae.decode(run, latents, tiled=tiling)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    assert image.shape[-2:] == (size, size) and np.isfinite(image).all()
    return {
        "model": str(root), "vae": vae.kind, "size": size, "tiling": tiling, "decoder_calls": len(calls),
        "tile_latents": sorted({tuple(int(d) for d in c) for c in calls}), "engine_load_s": load_s,
        "decode_s_median": statistics.median(times), "decode_s": times,
        "rss_after_load_mib": rss_loaded, "peak_rss_mib": _peak_rss_mib(),
    }


def _worker_cmd(args, model: str, tiling: bool) -> list[str]:
    cmd = [sys.executable, "-m", "sdrt.benchmarks.vae", "--worker", "--model", model, "--size", str(args.size),
           "--runs", str(args.runs), "--warmup", str(args.warmup)]
    return cmd + (["--tiling"] if tiling else []) + (["--threads", str(args.threads)] if args.threads else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.vae", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="sdrt model directory (repeatable)")
    ap.add_argument("--size", type=int, default=512, help="image height and width in pixels (default 512)")
    ap.add_argument("--tiling", action="store_true", help="decode in tiles (Pipeline.enable_vae_tiling)")
    ap.add_argument("--compare-tiling", action="store_true", help="measure each model whole and tiled")
    ap.add_argument("--runs", type=int, default=3, help="timed decodes per process (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes first (default 1)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: physical cores)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.model[0], args.size, args.tiling, args.runs, args.warmup, args.threads)))
        return 0
    from sdrt.benchmarks.machine import machine_facts

    results = []
    for model in args.model:
        for tiling in ((False, True) if args.compare_tiling else (args.tiling,)):
            proc = subprocess.run(_worker_cmd(args, model, tiling), capture_output=True, text=True)
            if proc.returncode:
                print(f"{model} tiling={tiling}: failed\n{proc.stderr.strip()}", file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{r['model']} ({r['vae']}) {r['size']}x{r['size']} tiling={'on' if tiling else 'off'}: "
                  f"decode median {r['decode_s_median']:.3f}s of {len(r['decode_s'])} "
                  f"({r['decoder_calls']} decoder call{'s' if r['decoder_calls'] > 1 else ''}), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB (after load {r['rss_after_load_mib']:.0f} MiB)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_facts(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
