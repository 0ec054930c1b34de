"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden state conditions the UNet
(diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=None). 2.x differs only in its
weights (OpenCLIP tower, v-prediction for the 768 models), which the manifest carries."""

from __future__ import annotations

from .base import Conditioning, Family, input_names, output_names


class StableDiffusion(Family):
    required = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, name: str):
        self.name = name

    def encode_text(self, engines, manifest, token_ids):
        rec = manifest["components"]["text_encoder"]
        out = engines["text_encoder"](**{input_names(rec)[0]: token_ids[0]})
        return Conditioning(out[output_names(rec)[0]])
