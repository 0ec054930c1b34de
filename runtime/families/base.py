"""What a model family is to the runtime: its components, how prompts become conditioning, and how the
UNet is fed. One subclass per family (sd.py, sdxl.py); nothing outside this package asks which family
a model is.

Tensor names come from the manifest's component records, never from literals here: a component's
inputs and outputs are listed in a fixed order by the export descriptors (export/families.py), and
the family binds them by position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import GenerationError


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per image: (B, L, D) hidden states (L = 77, or 77·k for
    prompts encoded in chunks) and, for families that have one, the (B, P) pooled text embedding."""

    hidden: np.ndarray
    pooled: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def repeat(self, n: int) -> "Conditioning":
        """Each row ``n`` times in a row (diffusers' num_images_per_prompt)."""
        if n == 1:
            return self
        return Conditioning(np.repeat(self.hidden, n, axis=0), None if self.pooled is None else np.repeat(self.pooled, n, axis=0))

    @staticmethod
    def concat(first: "Conditioning", second: "Conditioning") -> "Conditioning":
        """Rows of ``first`` then ``second``: negatives first, as diffusers stacks them for guidance."""
        pooled = None if first.pooled is None else np.concatenate([first.pooled, second.pooled])
        return Conditioning(np.concatenate([first.hidden, second.hidden]), pooled)

    def zeros_like(self) -> "Conditioning":
        return replace(self, hidden=np.zeros_like(self.hidden),
                       pooled=None if self.pooled is None else np.zeros_like(self.pooled))


def input_names(record: dict) -> list[str]:
    return [t["name"] for t in record["inputs"]]


def output_names(record: dict) -> list[str]:
    return [t["name"] for t in record["outputs"]]


def unet_inputs(manifest: dict) -> list[dict]:
    """The UNet's input records: sample, timestep, encoder_hidden_states, then the family's own."""
    return manifest["components"]["unet"]["inputs"]


def run_text_encoder(engines, manifest: dict, name: str, ids: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """One text encoder on (R, 77) token ids -> its outputs in record order. ``mask`` (R, 77) of 1 (attend)
    and 0 (masked out) goes to the encoder's attention_mask input; a model exported before sdrt gave text
    encoders one can only take an all-ones mask."""
    rec = manifest["components"][name]
    names = input_names(rec)
    ids = ids.astype(rec["inputs"][0]["dtype"], copy=False)  # int32 in sdrt's graphs, int64 in optimum's
    feed = {names[0]: ids}
    if len(names) > 1:
        feed[names[1]] = np.ones_like(ids) if mask is None else mask.astype(ids.dtype)
    elif mask is not None and not mask.all():
        raise GenerationError(
            f"this model's {name} takes no attention mask, which compel's down-weighting (a weight below 1) needs; "
            "re-export the model with this sdrt (`sdrt export CHECKPOINT --out DIR --overwrite`), or weight it 1 or more"
        )
    out = engines[name](**feed)
    return [out[n] for n in output_names(rec)]


def check_shape(x, expected: tuple, name: str) -> np.ndarray:
    """``x`` as float32, refused unless its shape matches ``expected`` (None: any size)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ")"
        raise GenerationError(f"{name} has shape {tuple(x.shape)}, expected {want} for this model")
    return x


class Family:
    """The facts and rules of one family; instances are stateless and shared."""

    name: str = ""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # the components every generation runs (opened and checked at load; the rest, the VAE encoder,
    # only some tasks need: engines.opens_lazily opens them on first use)
    required: tuple[str, ...] = ()
    default_guidance: float = 7.5
    has_pooled: bool = False  # whether the UNet also takes a pooled text embedding
    refines: bool = False  # an image-to-image model only (the SDXL refiner): it needs an image or latents
    unet_added_inputs: tuple[str, ...] = ()  # the UNet's inputs after encoder_hidden_states, as optimum names them

    def text_encoder_outputs(self, encoder: str, num_layers: int) -> list[str]:
        """The outputs of ``encoder`` (optimum's names) that the family conditions on, in record order."""
        return ["last_hidden_state"]

    def import_facts(self, model_index: dict, unet_config: dict) -> dict:
        """The family's own manifest facts, for a model directory read from optimum's layout."""
        return {}

    def text_states(self, engines, manifest: dict, token_ids: list[np.ndarray],
                    masks: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Token ids (one (R, 77) int32 array per text encoder, with an optional attention mask each) ->
        each encoder's (R, 77, D_i) hidden states, as the family conditions on them, and the pooled
        embedding (R, P) or None. Prompt weighting (runtime/prompts.py) works on these, encoder by encoder."""
        raise NotImplementedError

    def combine(self, states: list[np.ndarray]) -> np.ndarray:
        """The encoders' hidden states -> the UNet's (.., L, D): concatenated on features."""
        return states[0] if len(states) == 1 else np.concatenate(states, axis=-1)

    def encode_text(self, engines, manifest: dict, token_ids: list[np.ndarray]) -> Conditioning:
        """Token ids (one (B, 77) int32 array per text encoder) -> conditioning."""
        states, pooled = self.text_states(engines, manifest, token_ids)
        return Conditioning(self.combine(states), pooled)

    def embeds_conditioning(self, manifest: dict, hidden, pooled, names: tuple[str, str]) -> Conditioning:
        """diffusers' ``prompt_embeds`` (B, L, D) and pooled embeddings, checked against the UNet's inputs.
        ``names``: the two arguments' names, for the errors."""
        hidden = check_shape(hidden, (None, None, unet_inputs(manifest)[2]["shape"][-1]), names[0])
        if pooled is not None:
            raise GenerationError(f"{names[1]} is for SDXL models; this {self.name} model's UNet takes no pooled embedding")
        return Conditioning(hidden)

    def negative_for_empty_prompt(self, positive: Conditioning, manifest: dict) -> Conditioning | None:
        """The unconditional rows when no negative prompt is given, or None to encode "" as diffusers does."""
        return None

    def unet_conditioning(self, cond: Conditioning, manifest: dict, req) -> list[np.ndarray]:
        """The UNet's inputs after (sample, timestep), in the order its record lists them, for the request
        ``req`` (stages.Request: its size, guidance, micro-conditioning)."""
        return [cond.hidden]
