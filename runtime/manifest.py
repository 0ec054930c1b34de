"""The model directory's manifest, ``sdrt.json``: the contract between export and runtime (DESIGN.md).

Export writes it, the runtime and the engine builder read it. Shapes are lists whose entries are
ints (fixed) or strings (named dynamic dimensions, e.g. ``"batch"``, ``"latent_height"``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from .errors import ModelDirError

MANIFEST_NAME = "sdrt.json"
# What a model's UNet was trained for (manifest "task"; absent in format 1: text to image).
TEXT_TO_IMAGE, INPAINTING = "text-to-image", "inpainting"
# 2: the UNet's task and input channels (inpainting UNets take 9): an older sdrt refuses such a model
# instead of failing inside the engine; version 1 directories (text to image only) still load.
FORMAT_VERSION = 2
# Optional ``generation_defaults``: the sampling settings a model is meant to run with (as a
# transformers model's generation_config.json), used when a call does not give them.
GENERATION_DEFAULTS = ("guidance_scale", "num_inference_steps")


def check_generation_defaults(defaults) -> dict:
    """``defaults`` validated ({"guidance_scale": float >= 0, "num_inference_steps": int >= 1}, either
    may be absent; a guidance scale <= 1 means no classifier-free guidance, as in diffusers); raises
    ValueError saying what is wrong. Keys this sdrt does not know (a later one's) are dropped with a
    warning, so an older runtime still loads the model."""
    if not isinstance(defaults, dict):
        raise ValueError(f"generation_defaults must be an object, got {defaults!r}")
    unknown = sorted(set(defaults) - set(GENERATION_DEFAULTS))
    if unknown:
        warnings.warn(f"ignoring generation default(s) this sdrt does not know: {', '.join(unknown)} "
                      f"(known: {', '.join(GENERATION_DEFAULTS)})", stacklevel=2)
    out = {}
    if "guidance_scale" in defaults:
        g = defaults["guidance_scale"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"the default guidance_scale must be a number >= 0, got {g!r}")
        out["guidance_scale"] = float(g)
    if "num_inference_steps" in defaults:
        n = defaults["num_inference_steps"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the default num_inference_steps must be an integer >= 1, got {n!r}")
        out["num_inference_steps"] = n
    return out


def load_manifest(model_dir: str | os.PathLike) -> dict:
    """Read and check ``sdrt.json`` of ``model_dir``."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist; create one with `sdrt export CHECKPOINT --out {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(f"{path} is missing: {root} is not an sdrt model directory (make one with `sdrt export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path} cannot be read ({e}); re-export the model with `sdrt export --overwrite`") from e
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ModelDirError(f"{path} has no integer format_version; re-export the model with `sdrt export --overwrite`")
    if version > FORMAT_VERSION:
        raise ModelDirError(
            f"{path} has format version {version}, newer than this sdrt understands ({FORMAT_VERSION}); "
            f"upgrade sdrt (it was written by sdrt {manifest.get('sdrt_version', '?')})"
        )
    if "generation_defaults" in manifest:
        try:
            manifest["generation_defaults"] = check_generation_defaults(manifest["generation_defaults"])
        except ValueError as e:
            raise ModelDirError(f"{path}: {e}; fix it, or re-export the model with `sdrt export --overwrite`") from e
    return manifest
