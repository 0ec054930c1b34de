"""Stable Diffusion XL base: two text encoders whose penultimate hidden states are concatenated, the
second's projected pooled embedding, and the UNet's micro-conditioning time ids
(diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids)."""

from __future__ import annotations

import numpy as np

from ..errors import GenerationError
from .base import Conditioning, Family, check_shape, run_text_encoder, unet_inputs


class StableDiffusionXL(Family):
    name = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    required = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
    default_guidance = 5.0
    has_pooled = True
    unet_added_inputs = ("text_embeds", "time_ids")

    def text_encoder_outputs(self, encoder, num_layers):
        # the penultimate layer's states (and the second encoder's pooled embedding), as diffusers takes them
        return [f"hidden_states.{num_layers - 1}"] + (["text_embeds"] if encoder == "text_encoder_2" else [])

    def import_facts(self, model_index, unet_config):
        return {"force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
                "addition_time_embed_dim": unet_config.get("addition_time_embed_dim")}

    def text_states(self, engines, manifest, token_ids, masks=None):
        h1 = run_text_encoder(engines, manifest, "text_encoder", token_ids[0], masks and masks[0])[0]
        h2, pooled = run_text_encoder(engines, manifest, "text_encoder_2", token_ids[1], masks and masks[1])[:2]
        return [h1, h2], pooled  # penultimate states of both; the second's projected pooled embedding

    def embeds_conditioning(self, manifest, hidden, pooled, names):
        inputs = unet_inputs(manifest)
        hidden = check_shape(hidden, (None, None, inputs[2]["shape"][-1]), names[0])
        if pooled is None:  # as diffusers' StableDiffusionXLPipeline.check_inputs
            raise GenerationError(f"{names[0]} needs {names[1]} too: SDXL's UNet also takes the pooled text embedding")
        return Conditioning(hidden, check_shape(pooled, (len(hidden), inputs[3]["shape"][-1]), names[1]))

    def negative_for_empty_prompt(self, positive, manifest):
        # the checkpoint's force_zeros_for_empty_prompt (True for SDXL base): zeros, not the encoded ""
        return positive.zeros_like() if manifest.get("force_zeros_for_empty_prompt", True) else None

    def unet_conditioning(self, cond, manifest, req):
        # original_size + crops_coords_top_left + target_size, for every row, negatives included
        h, w = req.height, req.width
        time_ids = np.tile(np.array([h, w, 0, 0, h, w], dtype=np.float32), (len(cond), 1))
        return [cond.hidden, cond.pooled, time_ids]


class StableDiffusionXLRefiner(StableDiffusionXL):
    """The SDXL refiner: an image-to-image model conditioned on the second text encoder alone, with the
    aesthetic score in its time ids in place of the target size, the negative rows' their own
    (diffusers' StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score: encode_prompt without
    text_encoder, _get_add_time_ids). Given the base's latents and ``denoising_start``, it runs the last
    steps of the base's schedule (tasks.image_to_image)."""

    name = "sdxl-refiner"
    text_encoders = ("text_encoder_2",)
    required = ("text_encoder_2", "unet", "vae_decoder")
    refines = True

    def text_states(self, engines, manifest, token_ids, masks=None):
        h2, pooled = run_text_encoder(engines, manifest, "text_encoder_2", token_ids[0], masks and masks[0])[:2]
        return [h2], pooled

    def negative_for_empty_prompt(self, positive, manifest):
        return positive.zeros_like() if manifest.get("force_zeros_for_empty_prompt", False) else None

    def unet_conditioning(self, cond, manifest, req):
        # original_size + crops_coords_top_left + (aesthetic score,): the negative score on the negative rows
        h, w = req.height, req.width
        rows = [[h, w, 0, 0, req.aesthetic_score]] * req.batch
        if req.cfg:
            rows = [[h, w, 0, 0, req.negative_aesthetic_score]] * req.batch + rows
        return [cond.hidden, cond.pooled, np.array(rows, dtype=np.float32)]
