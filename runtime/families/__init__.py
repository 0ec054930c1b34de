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


def check_hand_off(base: dict, refiner: dict, where: str = "the refiner") -> None:
    """A base -> refiner hand-off needs a refiner, and a base whose latents it takes (an SDXL base: the same
    latent channels and VAE scale); GenerationError in one line otherwise."""
    from ..errors import GenerationError

    if not family_for(refiner).refines:
        raise GenerationError(f"{where} is a {refiner['family']} model, not an SDXL refiner (export one from a "
                              "stabilityai/stable-diffusion-xl-refiner-1.0 style checkpoint)")
    if family_for(base).refines or base["family"] != "sdxl":
        raise GenerationError(f"{where} refines SDXL base latents; this base is a {base['family']} model")
    for key in ("latent_channels", "vae_scale_factor"):
        if base[key] != refiner[key]:
            raise GenerationError(f"{where} takes latents with {key} {refiner[key]}, the base makes {base[key]}")


__all__ = ["FAMILIES", "Conditioning", "Family", "check_hand_off", "family_for"]
