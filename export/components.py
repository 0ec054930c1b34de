"""One descriptor per exported component: the torch module to trace, its named inputs and outputs
with dynamic dimensions, and sample inputs at a given shape (the TensorRT demo's pattern).

The shape facts written here go into sdrt.json; the runtime and the engine builder read them from
there, never from this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Named dynamic dimensions. Text length is fixed at the tokenizer's max length.
BATCH, LAT_H, LAT_W, IMG_H, IMG_W = "batch", "latent_height", "latent_width", "height", "width"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list  # ints and dimension names

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Component:
    name: str  # folder in the model directory
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # (batch, latent_h, latent_w) -> tuple of sample tensors in input order
    sample: Callable[[int, int, int], tuple]
    # shapes (batch, latent_h, latent_w) the export is validated at
    validation_shapes: list[tuple[int, int, int]]

    @property
    def dynamic_axes(self) -> dict:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs
        }


class TextEncoderOutputs(torch.nn.Module):
    """CLIP text tower returning exactly what the pipeline consumes.

    sd1/sd2 use the last hidden state (after the final layer norm); SDXL uses the penultimate
    layer's hidden states of both encoders and, from the second, the projected pooled embedding
    (diffusers' StableDiffusionXLPipeline.encode_prompt with clip_skip=None).
    """

    def __init__(self, encoder: torch.nn.Module, mode: str):
        super().__init__()
        self.encoder, self.mode = encoder, mode

    def forward(self, input_ids):
        ids = input_ids.to(torch.int64)
        if self.mode == "last":
            return self.encoder(ids, return_dict=True).last_hidden_state
        out = self.encoder(ids, output_hidden_states=True, return_dict=True)
        if self.mode == "penultimate":
            return out.hidden_states[-2]
        return out.hidden_states[-2], out.text_embeds  # "penultimate+pooled"


class UNetNoisePrediction(torch.nn.Module):
    """UNet2DConditionModel with a per-sample timestep vector and, for SDXL, the text_time conditioning."""

    def __init__(self, unet: torch.nn.Module, xl: bool):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VAEDecoder(torch.nn.Module):
    """latents (already divided by the scaling factor, outside the graph) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VAEEncoder(torch.nn.Module):
    """image in [-1, 1] -> the latent distribution's parameters (mean and log-variance, stacked on
    channels), so the runtime can sample from it with its own noise as diffusers' img2img does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


def _down_factor(unet) -> int:
    """Latent sizes must divide by 2^(number of downsampling blocks) for a clean trace."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def components_for(ckpt, max_length: int = 77) -> list[Component]:
    """Descriptors of every component of a loaded checkpoint, in export order."""
    xl = ckpt.family == "sdxl"
    L = max_length
    te_dim = ckpt.text_encoder.config.hidden_size
    comps = []

    # token ids valid for every text encoder (a trimmed vocabulary, like the default model's, is smaller)
    encoders = [ckpt.text_encoder] + ([ckpt.text_encoder_2] if getattr(ckpt, "text_encoder_2", None) is not None else [])
    vocab = min(te.config.vocab_size for te in encoders)

    def ids(b, h, w):
        return (torch.randint(0, vocab, (b, L), dtype=torch.int32),)

    te_mode = "penultimate" if xl else "last"
    te_out = "hidden_states" if xl else "last_hidden_state"
    comps.append(
        Component(
            "text_encoder",
            TextEncoderOutputs(ckpt.text_encoder, te_mode),
            [TensorSpec("input_ids", "int32", [BATCH, L])],
            [TensorSpec(te_out, "float32", [BATCH, L, te_dim])],
            ids,
            [(1, 0, 0), (2, 0, 0)],
        )
    )
    ctx_dim = te_dim
    if xl:
        te2 = ckpt.text_encoder_2
        d2, proj = te2.config.hidden_size, te2.config.projection_dim
        comps.append(
            Component(
                "text_encoder_2",
                TextEncoderOutputs(te2, "penultimate+pooled"),
                [TensorSpec("input_ids", "int32", [BATCH, L])],
                [TensorSpec("hidden_states", "float32", [BATCH, L, d2]), TensorSpec("text_embeds", "float32", [BATCH, proj])],
                ids,
                [(1, 0, 0), (2, 0, 0)],
            )
        )
        ctx_dim = te_dim + d2

    unet = ckpt.unet
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    lat = unet.config.sample_size
    f = _down_factor(unet)
    small = max(f, (lat // 2) // f * f)

    def unet_sample(b, h, w):
        x = (
            torch.randn(b, c_in, h, w),
            torch.full((b,), 500.0) + torch.arange(b, dtype=torch.float32) * 37,
            torch.randn(b, L, ctx_dim),
        )
        if xl:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            x += (torch.randn(b, pooled), torch.tensor([[h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0]] * b))
        return x

    unet_inputs = [
        TensorSpec("sample", "float32", [BATCH, c_in, LAT_H, LAT_W]),
        TensorSpec("timestep", "float32", [BATCH]),
        TensorSpec("encoder_hidden_states", "float32", [BATCH, L, ctx_dim]),
    ]
    if xl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        unet_inputs += [TensorSpec("text_embeds", "float32", [BATCH, pooled]), TensorSpec("time_ids", "float32", [BATCH, 6])]
    comps.append(
        Component(
            "unet",
            UNetNoisePrediction(unet, xl),
            unet_inputs,
            [TensorSpec("out_sample", "float32", [BATCH, c_out, LAT_H, LAT_W])],
            unet_sample,
            [(2, lat, lat), (1, small, max(f, (lat * 3 // 4) // f * f))],
        )
    )

    vae = ckpt.vae
    zc = vae.config.latent_channels
    # The VAE is validated at small sizes: its cost grows with pixels and no shape is special to it.
    vsmall = max(8, lat // 4)
    comps.append(
        Component(
            "vae_decoder",
            VAEDecoder(vae),
            [TensorSpec("latent_sample", "float32", [BATCH, zc, LAT_H, LAT_W])],
            [TensorSpec("sample", "float32", [BATCH, 3, IMG_H, IMG_W])],
            lambda b, h, w: (torch.randn(b, zc, h, w),),
            [(1, vsmall, vsmall), (2, vsmall // 2, vsmall)],
        )
    )
    comps.append(
        Component(
            "vae_encoder",
            VAEEncoder(vae),
            [TensorSpec("sample", "float32", [BATCH, 3, IMG_H, IMG_W])],
            [TensorSpec("latent_parameters", "float32", [BATCH, 2 * zc, LAT_H, LAT_W])],
            lambda b, h, w: (torch.rand(b, 3, h * 8, w * 8) * 2 - 1,),
            [(1, vsmall, vsmall), (2, vsmall // 2, vsmall)],
        )
    )
    return comps
