"""Model families, one module each, in a registry keyed by the manifest's ``family``.

    family = family_for(manifest)
    cond = family.encode_text(engines, manifest, token_ids)

Adding a family is adding a module here (and its export descriptor in export/families.py).
"""

from __future__ import annotations

from ..errors import ModelDirError
from .base import Conditioning, Family
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL, StableDiffusionXLRefiner

FAMILIES: dict[str, Family] = {
    "sd1": StableDiffusion("sd1"),
    "sd2": StableDiffusion("sd2"),
    "sdxl": StableDiffusionXL(),
    "sdxl-refiner": StableDiffusionXLRefiner(),
}


def family_for(manifest: dict) -> Family:
    name = manifest.get("family")
    if name not in FAMILIES:
        raise ModelDirError(
            f"the model's family {name!r} is not one this sdrt runs ({', '.join(FAMILIES)}); upgrade sdrt or re-export"
        )
    return FAMILIES[name]


__all__ = ["FAMILIES", "Conditioning", "Family", "family_for"]
