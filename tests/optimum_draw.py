"""Run in the optimum-onnx environment (tests/optimum_env.py), never beside sdrt:

    python optimum_draw.py MODEL_DIR LATENTS.npy OUT.npy PROMPT STEPS GUIDANCE

loads MODEL_DIR with optimum's ``ORTDiffusionPipeline.from_pretrained`` (which picks
ORTStableDiffusionPipeline or ORTStableDiffusionXLPipeline from model_index.json), draws PROMPT
from the given initial latents and saves the image, float32 (H, W, 3) in [0, 1], to OUT.npy.
"""

import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTDiffusionPipeline


def main(model_dir, latents_path, out_path, prompt, steps, guidance):
    pipe = ORTDiffusionPipeline.from_pretrained(model_dir)
    latents = torch.from_numpy(np.load(latents_path))
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), latents=latents,
                 height=h, width=w, output_type="np").images[0]
    np.save(out_path, np.asarray(image, dtype=np.float32))
    print(type(pipe).__name__)


if __name__ == "__main__":
    main(*sys.argv[1:])
