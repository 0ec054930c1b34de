"""How much the runtime's own loop costs next to the engines.

    python -m sdrt.benchmarks.loop_overhead --model DIR [--height 256 --width 256 --steps 10
                                            --scheduler dpm++2m --runs 3 --inpaint]

Everything in the denoising loop that is not an engine call (classifier-free guidance, input
scaling, the scheduler step, the NaN check, noise) is timed by the pipeline as `scheduler`;
this prints it per step and as a fraction of UNet time, median over runs after one warm-up.
``--inpaint`` times inpainting instead (a synthetic image, the left half masked): with an ordinary
UNet the per-step blend of the known region is part of the loop.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from sdrt.runtime.pipeline import Pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.loop_overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scheduler", default="dpm++2m")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--inpaint", action="store_true", help="time inpainting (left half masked) instead")
    args = ap.parse_args(argv)
    pipe = Pipeline.load(args.model, backend=args.backend)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
              scheduler=args.scheduler, seed=0, output_type="np")
    if args.inpaint:
        h = args.height or pipe.manifest["native_resolution"]
        w = args.width or pipe.manifest["native_resolution"]
        mask = np.zeros((h, w), np.float32)
        mask[:, : w // 2] = 1.0
        kw.update(image=np.random.default_rng(0).random((h, w, 3), dtype=np.float32), mask_image=mask)
    pipe("warm-up", **kw)
    per_step, unet_step, frac = [], [], []
    for i in range(args.runs):
        t = pipe("a red circle on a blue background", **kw).timings
        n = len(t.unet)
        per_step.append(t.scheduler / n)
        unet_step.append(sum(t.unet) / n)
        frac.append(t.scheduler / sum(t.unet))
    result = {
        "model": args.model,
        "backend": pipe.backend,
        "height": kw["height"] or pipe.manifest["native_resolution"],
        "scheduler": args.scheduler,
        "task": "inpaint" if args.inpaint else "text-to-image",
        "steps": args.steps,
        "loop_ms_per_step_median": statistics.median(per_step) * 1e3,
        "unet_ms_per_step_median": statistics.median(unet_step) * 1e3,
        "loop_fraction_of_unet_median": statistics.median(frac),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
