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


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per image: (B, 77, D) hidden states and, for families
    that have one, the (B, P) pooled text embedding."""

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


class Family:
    """The facts and rules of one family; instances are stateless and shared."""

    name: str = ""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # the components every generation runs (opened and checked at load; the rest, the VAE encoder,
    # only some tasks need: engines.opens_lazily opens them on first use)
    required: tuple[str, ...] = ()
    default_guidance: float = 7.5

    def encode_text(self, engines, manifest: dict, token_ids: list[np.ndarray]) -> Conditioning:
        """Token ids (one (B, 77) int32 array per text encoder) -> conditioning."""
        raise NotImplementedError

    def negative_for_empty_prompt(self, positive: Conditioning, manifest: dict) -> Conditioning | None:
        """The unconditional rows when no negative prompt is given, or None to encode "" as diffusers does."""
        return None

    def unet_conditioning(self, cond: Conditioning, manifest: dict, height: int, width: int) -> list[np.ndarray]:
        """The UNet's inputs after (sample, timestep), in the order its record lists them."""
        return [cond.hidden]
