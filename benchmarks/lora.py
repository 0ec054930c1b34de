"""LoRA without re-export: what loading and switching adapters costs, against a fresh load and a re-export.

    python -m sdrt.benchmarks.lora --model DIR --checkpoint CKPT [--loras A B] [--runs 3]
                                   [--height 256 --steps 2] [--no-reexport] [--out lora.json]

Each contender runs in its own process, after one warm-up process (which fills ONNX Runtime's
optimized-graph cache):

- ``fresh load``: ``Pipeline.load`` of the model directory, then one generation (peak RSS: the base);
- ``lora``: ``Pipeline.load``, ``load_lora_weights(A)`` (load one), ``load_lora_weights(B)``, then
  ``set_adapters`` alternating between them (switch), a generation after each change (peak RSS);
- ``re-export``: ``sdrt export`` of the checkpoint (what a LoRA costs without this: the fuse itself
  comes on top, so this is a lower bound).

Without ``--loras`` two LoRAs are made from the checkpoint with peft, rank 16, in diffusers' format:
``--targets kohya`` (default) on the UNet's attention, feed-forward and projection layers and the text
encoder's attention and MLP (what kohya's trainer targets by default), ``--targets attention`` on the
attention projections only (diffusers' LoRA training script). Prints medians and ratios; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _generate(pipe, args):
    pipe("a red circle on a blue background", num_inference_steps=args.steps, height=args.height,
         width=args.height, seed=0, output_type="np")


def worker(args) -> dict:
    from sdrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model, backend=args.backend)
    out = {"load_s": time.perf_counter() - t0}
    if args.worker == "lora":
        a, b = args.loras
        t0 = time.perf_counter()
        pipe.load_lora_weights(a, adapter_name="a")
        out["load_lora_s"] = time.perf_counter() - t0
        _generate(pipe, args)
        pipe.load_lora_weights(b, adapter_name="b")
        switches = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            pipe.set_adapters("a" if i % 2 == 0 else "b")
            switches.append(time.perf_counter() - t0)
            _generate(pipe, args)
        out["switch_s"] = switches
        t0 = time.perf_counter()
        pipe.unload_lora_weights()
        out["unload_s"] = time.perf_counter() - t0
    _generate(pipe, args)
    out["peak_rss_gib"] = _rss_gib()
    return out


TARGETS = {
    # kohya's trainer default: every Linear of the transformer blocks and the projections; text encoder attention + MLP
    "kohya": (["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
              ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    # diffusers' train_text_to_image_lora.py default: attention only
    "attention": (["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]),
}


def make_loras(checkpoint: Path, dest: Path, targets: str = "kohya") -> list[Path]:
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    paths = []
    for seed in (0, 1):
        out = dest / f"lora-{targets}-{seed}"
        if not (out / "pytorch_lora_weights.safetensors").is_file():
            pipe = DiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
            torch.manual_seed(seed)
            unet_targets, text_targets = TARGETS[targets]
            ucfg = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False, target_modules=unet_targets)
            tcfg = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False, target_modules=text_targets)
            pipe.unet.add_adapter(ucfg)
            inject_adapter_in_model(tcfg, pipe.text_encoder)
            type(pipe).save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                         text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
            del pipe
        paths.append(out)
    return paths


def _run(args, kind: str) -> dict:
    cmd = [sys.executable, "-m", "sdrt.benchmarks.lora", "--worker", kind, "--model", str(args.model),
           "--height", str(args.height), "--steps", str(args.steps), "--runs", str(args.runs), "--backend", args.backend]
    if kind == "lora":
        cmd += ["--loras", *map(str, args.loras)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def reexport_s(checkpoint: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="sdrt-reexport-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdrt", "export", str(checkpoint), "--out", f"{tmp}/m"],
                       check=True, capture_output=True)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.lora", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--checkpoint", type=Path, help="the checkpoint the model was exported from (test LoRAs, re-export)")
    ap.add_argument("--loras", nargs=2, type=Path, help="two LoRA files or folders (default: made from --checkpoint)")
    ap.add_argument("--targets", choices=tuple(TARGETS), default="kohya",
                    help="layers the made LoRAs touch (kohya: all transformer Linears, default; attention: q/k/v/out)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--no-reexport", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=("base", "lora"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.loras is None:
        if args.checkpoint is None:
            ap.error("give --loras A B, or --checkpoint to make two")
        args.loras = make_loras(args.checkpoint, Path(tempfile.gettempdir()) / f"sdrt-bench-loras-{args.checkpoint.name}",
                                args.targets)
    _run(args, "base")  # warm-up: fills the optimized-graph cache and the page cache
    base = [_run(args, "base") for _ in range(args.runs)]
    lora = _run(args, "lora")
    fresh = statistics.median(r["load_s"] for r in base)
    switch = statistics.median(lora["switch_s"])
    rss_base = statistics.median(r["peak_rss_gib"] for r in base)
    report = {
        "model": str(args.model), "loras": [str(p) for p in args.loras], "targets": args.targets, "height": args.height, "steps": args.steps,
        "fresh_load_s": fresh, "load_one_lora_s": lora["load_lora_s"], "switch_s_median": switch,
        "switch_s": lora["switch_s"], "unload_s": lora["unload_s"],
        "peak_rss_gib_base": rss_base, "peak_rss_gib_lora": lora["peak_rss_gib"],
        "switch_over_fresh_load": switch / fresh, "rss_ratio": lora["peak_rss_gib"] / rss_base,
    }
    if not args.no_reexport and args.checkpoint:
        report["reexport_s"] = reexport_s(args.checkpoint)
        report["switch_over_reexport"] = switch / report["reexport_s"]
    rows = [("fresh Pipeline.load", f"{fresh:.2f} s"), ("load one LoRA", f"{lora['load_lora_s']:.2f} s"),
            ("switch (set_adapters)", f"{switch:.2f} s  ({switch / fresh:.2f}x a fresh load)"),
            ("unload", f"{lora['unload_s']:.2f} s"),
            ("peak RSS base / with LoRAs", f"{rss_base:.2f} / {lora['peak_rss_gib']:.2f} GiB  ({report['rss_ratio']:.2f}x)")]
    if "reexport_s" in report:
        rows.append(("re-export (sdrt export)", f"{report['reexport_s']:.1f} s  (switch = {report['switch_over_reexport']:.1%})"))
    for k, v in rows:
        print(f"{k:30s} {v}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
