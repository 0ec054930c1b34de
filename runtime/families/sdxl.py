"""Stable Diffusion XL base: two text encoders whose penultimate hidden states are concatenated, the
second's projected pooled embedding, and the UNet's micro-conditioning time ids
(diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids)."""

from __future__ import annotations

import numpy as np

from .base import Conditioning, Family, input_names, output_names


class StableDiffusionXL(Family):
    name = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    required = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
    default_guidance = 5.0

    def encode_text(self, engines, manifest, token_ids):
        rec1, rec2 = manifest["components"]["text_encoder"], manifest["components"]["text_encoder_2"]
        h1 = engines["text_encoder"](**{input_names(rec1)[0]: token_ids[0]})[output_names(rec1)[0]]
        out2 = engines["text_encoder_2"](**{input_names(rec2)[0]: token_ids[1]})
        hidden2, pooled = (out2[name] for name in output_names(rec2)[:2])  # penultimate states, projected pooled
        return Conditioning(np.concatenate([h1, hidden2], axis=-1), pooled)

    def negative_for_empty_prompt(self, positive, manifest):
        # the checkpoint's force_zeros_for_empty_prompt (True for SDXL base): zeros, not the encoded ""
        return positive.zeros_like() if manifest.get("force_zeros_for_empty_prompt", True) else None

    def unet_conditioning(self, cond, manifest, height, width):
        # original_size + crops_coords_top_left + target_size, for every row, negatives included
        time_ids = np.tile(np.array([height, width, 0, 0, height, width], dtype=np.float32), (len(cond), 1))
        return [cond.hidden, cond.pooled, time_ids]
