"""Where an OpenVINO component's time goes: per OpenVINO node type and kernel, with the arithmetic rate.

    python -m sdrt.benchmarks.ov_profile --model DIR [--component unet] [--precision bf16]
                                         [--height 256 --width 256] [--runs 4] [--json PATH]

The component is the one ``Pipeline.load(DIR, backend="openvino", precision=...)`` runs (the bf16-weights IR,
the int8 variant), compiled with OpenVINO's ``PERF_COUNT``, fed random inputs of the benchmark's shape (the
UNet at batch 2, as under classifier-free guidance; the VAE decoder at batch 1), warmed up once, then timed
``--runs`` times; the per-node profile is the last run's. FLOPs are counted from the exported ONNX graph
(``flops.py``), so the call's GFLOP/s and the convolutions' own show how close the kernels run to the
machine's limit.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.pipeline import Pipeline

from .flops import graph_flops


def input_shapes(record: dict, dims: dict) -> dict:
    """The manifest record's input shapes, its named dims fixed by ``dims``."""
    return {s["name"]: [d if isinstance(d, int) else dims[d] for d in s["shape"]] for s in record["inputs"]}


def feeds(record: dict, shapes: dict) -> dict:
    """Random inputs of these shapes for the manifest record's inputs."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in record["inputs"]:
        shape = shapes[spec["name"]]
        if spec["dtype"].startswith("int"):
            x = np.ones(shape) if "mask" in spec["name"] else rng.integers(0, 49407, shape)
        elif spec["name"] == "timestep":
            x = np.full(shape, 500.0)
        else:
            x = rng.standard_normal(shape)
        out[spec["name"]] = x.astype(spec["dtype"])
    return out


def profile(model: str, component: str, precision: str, height: int | None, width: int | None, runs: int) -> dict:
    pipe = Pipeline.load(model, backend="openvino", precision=precision)
    manifest = pipe.manifest
    f = manifest.get("vae_scale_factor", 8)
    h, w = height or manifest["native_resolution"], width or manifest["native_resolution"]
    dims = {"batch": 2 if component == "unet" else 1, "latent_height": h // f, "latent_width": w // f,
            "text_length": 77, "height": h, "width": w}
    record = manifest["components"][component]
    engine = pipe.engine(component)
    engine = getattr(engine, "_engine", engine)  # an int8 UNet's, behind its LoRA guard
    engine.config["PERF_COUNT"] = True
    shapes = input_shapes(record, dims)
    x = feeds(record, shapes)
    engine(**x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine(**x)
        times.append(time.perf_counter() - t0)
    nodes = engine.profiling_info()
    by_type, by_kernel, count = collections.Counter(), collections.Counter(), collections.Counter()
    for n in nodes:
        by_type[n["type"]] += n["seconds"]
        by_kernel[f"{n['type']} / {n['kernel']}"] += n["seconds"]
        count[n["type"]] += 1
    fl = graph_flops(Path(model) / record["file"], dims, shapes)
    median = statistics.median(times)
    conv_s = by_type.get("Convolution", 0.0)
    return {
        "model": model, "component": component, "precision": precision, "height": h, "width": w,
        "inputs": shapes, "runs_s": times, "median_s": median,
        "gflop": fl.flops / 1e9, "gflop_per_s": fl.flops / 1e9 / median,
        "conv_gflop_per_s": (fl.by_op.get("Conv", 0) / 1e9 / conv_s) if conv_s else None,
        "profiled_s": sum(by_type.values()),
        "by_type": {k: {"seconds": v, "nodes": count[k]} for k, v in by_type.most_common()},
        "by_kernel": dict(by_kernel.most_common()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.ov_profile", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--component", default="unet")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    r = profile(args.model, args.component, args.precision, args.height, args.width, args.runs)
    print(f"{r['component']} {r['precision']} {r['inputs']}: median {1e3 * r['median_s']:.0f} ms, "
          f"{r['gflop']:.1f} GFLOP, {r['gflop_per_s']:.0f} GFLOP/s"
          + (f" (convolutions {r['conv_gflop_per_s']:.0f} GFLOP/s)" if r["conv_gflop_per_s"] else ""))
    total = r["profiled_s"] or 1.0
    for name, v in r["by_type"].items():
        if v["seconds"] >= 0.001 * total:
            print(f"  {name:24s} {1e3 * v['seconds']:8.1f} ms {100 * v['seconds'] / total:5.1f}%  {v['nodes']} nodes")
    for name, s in list(r["by_kernel"].items())[:8]:
        print(f"  {name:48s} {1e3 * s:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
