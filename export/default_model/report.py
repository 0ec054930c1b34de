"""Measure the built-in default model: prompt accuracy on held-out and training-distribution prompts,
for sdrt's runtime and for diffusers on the same checkpoint, from the same initial latents.

    python -m sdrt.export.default_model.report [--model DIR] [--checkpoint CKPT] [--n 64] [--seed 0]
        [--steps 20] [--guidance 1,3,7.5] [--backend auto] [--precision fp32] [--json FILE] [--grid FILE]

``--model`` is an sdrt model directory (default: the shipped default model); ``--checkpoint`` the
diffusers checkpoint it was exported from (optional: without it only sdrt runs, and no torch is
needed); ``--backend`` and ``--precision`` are passed to ``Pipeline.load`` (bf16 on OpenVINO, int8 once
`sdrt quantize` has written the model's int8 UNet), to score a reduced precision against fp32. Prompts are
``data.held_out_prompts`` (each has at least one object whose (colour, shape) or (shape, position) pairing
never occurs in training) and ``data.train_dist_prompts`` (fresh scenes of the training distribution), fully
specified. Both runtimes start every image from the same numpy latents, so
their accuracies must agree (the report gives the largest pixel difference between them). Scores
come from ``evaluate.accuracy``: per attribute, the fraction of the objects (or prompts, for the
background) the image got right.

It also measures the negative prompt (at the largest guidance given): for prompts that name no
colour, the colour the model draws most often is put in the negative prompt, and the share of
images whose (largest) object is drawn in it is reported before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import PRECISIONS

from . import data, evaluate

LATENT_SHAPE = (4, data.SIZE // 8, data.SIZE // 8)
ATTRIBUTES = ("colour", "shape", "position", "size", "background", "count")
# Prompts without a colour, for the negative-prompt measurement.
COLOURLESS = [f"a {size} {shape} {where}" for size in ("small", "large") for shape in data.SHAPES
              for where in ("in the centre", "on the left")]


def initial_latents(n: int, seed: int) -> np.ndarray:
    """(n, 4, 16, 16) float32 standard-normal latents, the same for every runtime."""
    return np.random.default_rng([seed, 0x1A7]).standard_normal((n, *LATENT_SHAPE)).astype(np.float32)


def sdrt_images(pipe, prompts, latents, steps: int, guidance: float, negative=None, batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        neg = None if negative is None else negative[i : i + batch]
        r = pipe(prompts[i : i + batch], negative_prompt=neg, latents=latents[i : i + batch],
                 num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        out.append(r.images)
    return np.concatenate(out)


def diffusers_images(pipe, prompts, latents, steps: int, guidance: float, batch: int = 16) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        r = pipe(prompts[i : i + batch], latents=torch.from_numpy(latents[i : i + batch]), height=data.SIZE,
                 width=data.SIZE, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        out.append(r.images)
    return np.concatenate(out)


def load_diffusers(checkpoint: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def negative_prompt_effect(pipe, steps: int, guidance: float, seed: int) -> dict:
    """Share of images whose largest object has the model's favourite colour (for colourless prompts),
    without and with that colour as the negative prompt."""
    latents = initial_latents(len(COLOURLESS), seed + 1)
    before = sdrt_images(pipe, COLOURLESS, latents, steps, guidance)
    colours = [c.colour for img in before for c in evaluate.analyse(img, classify=False).components[:1]]
    if not colours:
        raise RuntimeError("no object found in any image of the colourless prompts")
    top, _ = Counter(colours).most_common(1)[0]
    after = sdrt_images(pipe, COLOURLESS, latents, steps, guidance, negative=[top] * len(COLOURLESS))
    after_colours = [c.colour for img in after for c in evaluate.analyse(img, classify=False).components[:1]]
    return {
        "colour": top,
        "share_before": colours.count(top) / max(len(colours), 1),
        "share_after": after_colours.count(top) / max(len(after_colours), 1),
        "n": len(COLOURLESS),
    }


def grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    imgs = [evaluate.to_uint8(im) for im in images]
    while len(imgs) % cols:
        imgs.append(np.zeros_like(imgs[0]))
    rows = [np.concatenate(imgs[i : i + cols], axis=1) for i in range(0, len(imgs), cols)]
    return np.concatenate(rows, axis=0)


def _fmt(acc: dict) -> str:
    return " ".join(f"{k} {acc[k]:.3f}" for k in ATTRIBUTES if acc.get(k) is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.export.default_model.report", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="sdrt model directory (default: the shipped default model)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="the diffusers checkpoint, to score diffusers too")
    ap.add_argument("--n", type=int, default=64, help="prompts per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", default="1,3,7.5", help="comma list of guidance scales")
    ap.add_argument("--backend", default="auto", help="sdrt's backend: auto, ort-cpu, openvino, ... (default auto)")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="fp32 (default), bf16 (openvino) or int8 (after `sdrt quantize DIR`)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grid", type=Path, default=None, help="PNG of the first 16 held-out images at the last guidance")
    args = ap.parse_args(argv)

    from sdrt.runtime.default_model import default_model_dir
    from sdrt.runtime.pipeline import Pipeline

    model = args.model or default_model_dir()
    if model is None:
        print("error: no --model given and the default model is not installed", file=sys.stderr)
        return 2
    try:
        pipe = Pipeline.load(model, backend=args.backend, precision=args.precision)
    except SdrtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = load_diffusers(args.checkpoint) if args.checkpoint else None
    scales = [float(g) for g in args.guidance.split(",")]
    sets = {"held_out": data.held_out_prompts(args.n, args.seed), "train_dist": data.train_dist_prompts(args.n, args.seed)}
    report: dict = {"model": str(model), "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                    "backend": pipe.backend, "precision": args.precision, "n": args.n, "seed": args.seed,
                    "steps": args.steps, "results": []}
    for name, prompts in sets.items():
        latents = initial_latents(len(prompts), args.seed)
        for g in scales:
            t = time.perf_counter()
            imgs = sdrt_images(pipe, prompts, latents, args.steps, g)
            row = {"set": name, "guidance": g, "sdrt": evaluate.accuracy(imgs, prompts),
                   "sdrt_s": round(time.perf_counter() - t, 2)}
            line = f"{name:10s} guidance {g:4g}  sdrt: {_fmt(row['sdrt'])}"
            if ref is not None:
                t = time.perf_counter()
                ref_imgs = diffusers_images(ref, prompts, latents, args.steps, g)
                row["diffusers"] = evaluate.accuracy(ref_imgs, prompts)
                row["diffusers_s"] = round(time.perf_counter() - t, 2)
                row["max_abs_diff"] = float(np.abs(ref_imgs - imgs).max())
                line += f"\n{'':10s} {'':13s} diffusers: {_fmt(row['diffusers'])}  (max |diff| {row['max_abs_diff']:.1e})"
            print(line, flush=True)
            report["results"].append(row)
            if args.grid and name == "held_out" and g == scales[-1]:
                from PIL import Image

                args.grid.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid(imgs[:16])).save(args.grid)
                report["grid_prompts"] = prompts[:16]
    neg = negative_prompt_effect(pipe, args.steps, max(scales), args.seed)
    report["negative_prompt"] = neg
    print(f"negative prompt {neg['colour']!r} on {neg['n']} colourless prompts: objects in that colour "
          f"{neg['share_before']:.2f} -> {neg['share_after']:.2f} (guidance {max(scales):g})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
