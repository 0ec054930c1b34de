"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden state conditions the UNet
(diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=None). 2.x differs only in its
weights (OpenCLIP tower, v-prediction for the 768 models), which the manifest carries."""

from __future__ import annotations

from .base import Family, run_text_encoder


class StableDiffusion(Family):
    required = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, name: str):
        self.name = name

    def text_states(self, engines, manifest, token_ids, masks=None):
        hidden = run_text_encoder(engines, manifest, "text_encoder", token_ids[0], masks and masks[0])[0]
        return [hidden], None
