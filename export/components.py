"""One descriptor per exported component: the torch module to trace, its named inputs and outputs
with dynamic dimensions, and sample inputs at a given shape (the TensorRT demo's pattern). Each
family builds its components from these (sdrt.export.families).

The shape facts written here go into sdrt.json; the runtime and the engine builder read them from
there, never from this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Named dynamic dimensions. A text encoder takes the tokenizer's max length (77); the UNet takes 77·k
# tokens of text conditioning (prompts encoded in chunks: sdrt.runtime.prompts).
BATCH, LAT_H, LAT_W, IMG_H, IMG_W = "batch", "latent_height", "latent_width", "height", "width"
TEXT_LEN = "text_length"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list  # ints and dimension names

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Component:
    name: str  # the component's key in the manifest; its folder in the model directory unless ``folder``
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # (batch, latent_h, latent_w) -> tuple of sample tensors in input order
    sample: Callable[[int, int, int], tuple]
    # shapes (batch, latent_h, latent_w) the export is validated at
    validation_shapes: list[tuple[int, int, int]]
    # every output of the graph, in the module's order, when the graph has more than ``outputs`` (those the
    # runtime binds, in binding order: what the manifest records): optimum's pipelines read the rest
    graph_outputs: list[TensorSpec] | None = None
    # inputs a caller may leave out: name -> the value the graph uses then (an initializer of that name)
    defaults: dict = field(default_factory=dict)
    # the folder in the model directory when not ``name`` (a ControlNet's: controlnet/<name>)
    folder: str | None = None
    # the config.json written beside the graph when not the checkpoint module's (exporter.component_config)
    config: dict | None = None
    # the shape (batch, latent_h, latent_w) traced at, when not the first validation shape: any shape the
    # graph's dynamic dimensions generalise from (a UNet at a small latent size, to bound the tracer's memory)
    trace_at: tuple[int, int, int] | None = None

    @property
    def trace_shape(self) -> tuple[int, int, int]:
        return self.trace_at or self.validation_shapes[0]

    @property
    def all_outputs(self) -> list[TensorSpec]:
        return self.graph_outputs if self.graph_outputs is not None else self.outputs

    @property
    def dynamic_axes(self) -> dict:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.all_outputs
        }


def text_encoder_component(name: str, module: torch.nn.Module, outputs: list[TensorSpec], ids, length: int,
                           graph_outputs: list[TensorSpec] | None = None) -> Component:
    """A text encoder's descriptor: token ids and their attention mask, (batch, length) int32, in;
    ``outputs`` out (``graph_outputs``: all the graph's, when it has more); ``ids(b, h, w)`` its sample
    inputs; validated at batch 1 and 2. The mask may be left out (all ones, the unmasked encoder), as
    optimum's and diffusers' ONNX pipelines call a text encoder with the token ids alone."""
    import numpy as np

    inputs = [TensorSpec("input_ids", "int32", [BATCH, length]), TensorSpec("attention_mask", "int32", [BATCH, length])]
    return Component(name, module, inputs, outputs, ids, [(1, 0, 0), (2, 0, 0)], graph_outputs,
                     defaults={"attention_mask": np.ones((1, length), np.int32)})


def hidden_state_outputs(layers: int, length: int, width: int) -> list[TensorSpec]:
    """``hidden_states.0`` (the embeddings) .. ``hidden_states.N`` (the last layer's, before the final layer
    norm): the outputs optimum's text encoders add (``output_hidden_states``), which its SDXL pipeline reads."""
    return [TensorSpec(f"hidden_states.{i}", "float32", [BATCH, length, width]) for i in range(layers + 1)]


class TextEncoderOutputs(torch.nn.Module):
    """CLIP text tower returning exactly what the pipeline consumes.

    sd1/sd2 use the last hidden state (after the final layer norm); SDXL uses the penultimate
    layer's hidden states of both encoders and, from the second, the projected pooled embedding
    (diffusers' StableDiffusionXLPipeline.encode_prompt with clip_skip=None), and its graphs give every
    layer's hidden states as optimum's do, so that optimum's SDXL pipeline runs them too. The attention mask (1 attend,
    0 masked out) is what compel's down-weighting needs; all ones is the unmasked encoder exactly.
    """

    def __init__(self, encoder: torch.nn.Module, mode: str):
        super().__init__()
        self.encoder, self.mode = encoder, mode

    def forward(self, input_ids, attention_mask):
        # the mask broadcast to the ids' batch: the graph's default mask, (1, L), serves any batch
        ids, mask = input_ids.to(torch.int64), attention_mask.to(torch.int64).expand(input_ids.shape)
        if self.mode == "last":
            return self.encoder(ids, attention_mask=mask, return_dict=True).last_hidden_state
        out = self.encoder(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        # optimum's outputs, in its order (sdrt binds hidden_states.{N-1}, the penultimate layer's, and text_embeds)
        if self.mode == "hidden_states":
            return (out.last_hidden_state, out.pooler_output, *out.hidden_states)
        return (out.text_embeds, out.last_hidden_state, *out.hidden_states)  # "pooled+hidden_states"


class UNetNoisePrediction(torch.nn.Module):
    """UNet2DConditionModel with a per-sample timestep vector; further inputs, in the order ``added``
    names them, go to its ``added_cond_kwargs`` (SDXL's text_time conditioning: text_embeds, time_ids)."""

    def __init__(self, unet: torch.nn.Module, added: list[str] = ()):
        super().__init__()
        self.unet, self.added = unet, tuple(added)

    def forward(self, sample, timestep, encoder_hidden_states, *added):
        cond = dict(zip(self.added, added)) if self.added else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


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


class TinyVAEEncoder(torch.nn.Module):
    """AutoencoderTiny (TAESD): image in [-1, 1] -> the latents themselves (``encode(x).latents``; no
    distribution to sample)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encoder(sample)
