"""The model directory's manifest, ``sdrt.json``: the contract between export and runtime (DESIGN.md).

Export writes it, the runtime and the engine builder read it. Shapes are lists whose entries are
ints (fixed) or strings (named dynamic dimensions, e.g. ``"batch"``, ``"latent_height"``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path, PureWindowsPath

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
    """Read and check ``sdrt.json`` of ``model_dir``: ModelDirError, in one line naming the file and the
    key, for a manifest that is malformed, newer than this sdrt, or names a file outside the directory."""
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
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path} is not a JSON object; re-export the model with `sdrt export --overwrite`")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ModelDirError(f"{path} has no integer format_version; re-export the model with `sdrt export --overwrite`")
    if version > FORMAT_VERSION:
        raise ModelDirError(
            f"{path} has format version {version}, newer than this sdrt understands ({FORMAT_VERSION}); "
            f"upgrade sdrt (it was written by sdrt {manifest.get('sdrt_version', '?')})"
        )
    check_manifest(manifest, path)
    if "generation_defaults" in manifest:
        try:
            manifest["generation_defaults"] = check_generation_defaults(manifest["generation_defaults"])
        except ValueError as e:
            raise ModelDirError(f"{path}: {e}; fix it, or re-export the model with `sdrt export --overwrite`") from e
    return manifest


# What this runtime reads, key -> accepted types; a key ending in "?" may be absent. Keys not listed
# (a later sdrt's) are not checked, so an older runtime still loads the model.
_N = type(None)
_TOP = {"family": str, "latent_channels": int, "vae_scale_factor": int, "vae_scaling_factor": (int, float),
        "native_resolution": int, "tokenizers": list, "components": dict, "sdrt_version?": str, "task?": str,
        "prediction_type?": str, "unet_in_channels?": int, "vae_shift_factor?": (int, float, _N), "vae?": dict,
        "scheduler_class?": (str, _N), "engines?": (dict, _N), "force_zeros_for_empty_prompt?": bool,
        "controlnets?": list, "controlnet_unet?": str}
_TOKENIZER = {"file": str, "max_length": int, "pad_token_id?": int, "eos_token_id?": int, "bos_token_id?": (int, _N)}
_COMPONENT = {"file": str, "inputs": list, "outputs": list, "external_data?": (str, _N), "weights?": str, "config?": str,
              "precision?": str, "size_bytes?": int, "sha256?": (str, _N), "external_data_sha256?": (str, _N)}
_TENSOR = {"name": str, "dtype": str, "shape": list}
_VAE = {"class": str, "tiling?": dict}  # which VAE (runtime/vae.py) and its tile sizes
_CONTROLNET = {"name": str, "component": str, "conditioning_input": str, "residuals": list,
               "conditioning_channels?": int}  # runtime/controlnet.py
_ENGINE_SET = {"components": dict}
_ENGINE = {"file": str, "sha256?": str, "size_bytes?": int, "profile?": dict}
_NON_EMPTY = ("tokenizers", "inputs", "outputs")
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
          dict: "an object", _N: "null"}


def _bad(where, key: str, problem: str) -> ModelDirError:
    return ModelDirError(f"{where}: {key} {problem}; re-export the model with `sdrt export --overwrite`")


def _check(where, obj, schema: dict, at: str) -> None:
    if not isinstance(obj, dict):
        raise _bad(where, at, f"must be an object, got {obj!r:.60}")
    for spec, types in schema.items():
        key = spec.rstrip("?")
        name = f"{at}.{key}" if at else key
        if key not in obj:
            if spec.endswith("?"):
                continue
            raise _bad(where, name, "is missing")
        value, types = obj[key], types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join(_KINDS[t] for t in types if not (t is int and float in types))
            raise _bad(where, name, f"must be {kinds}, got {value!r:.60}")
        if key in _NON_EMPTY and not value:
            raise _bad(where, name, "is empty")


def _check_inside(where, key: str, rel: str) -> None:
    """Refuse a file path that is absolute or climbs out of the model directory, before anything is opened
    (checked on the path as written: a symlink inside, as in the Hub's cache, is the user's own choice)."""
    p = PureWindowsPath(rel)  # splits on slashes and backslashes alike; its anchor is set for /x, \x and C:x
    if not rel or p.anchor or ".." in p.parts:
        raise ModelDirError(f"{where}: {key} {rel!r} is not a path inside the model directory; "
                            "the manifest is damaged or hostile: re-export the model with `sdrt export --overwrite`")


def check_manifest(manifest: dict, where) -> None:
    """ModelDirError naming the key (``sdrt.json: components.unet.inputs is missing``) unless ``manifest``
    has what this runtime reads, of the right types, for a family it runs, with every file inside the directory."""
    from .families import FAMILIES

    _check(where, manifest, _TOP, "")
    family = FAMILIES.get(manifest["family"])
    if family is None:
        raise ModelDirError(f"{where}: family {manifest['family']!r} is not one this sdrt runs ({', '.join(FAMILIES)}); "
                            "upgrade sdrt, or re-export the model")
    if "vae" in manifest:
        _check(where, manifest["vae"], _VAE, "vae")
    if manifest.get("task", TEXT_TO_IMAGE) not in (TEXT_TO_IMAGE, INPAINTING):
        raise _bad(where, "task", f"{manifest['task']!r} is not {TEXT_TO_IMAGE} or {INPAINTING}")
    files = []
    for i, rec in enumerate(manifest["tokenizers"]):
        _check(where, rec, _TOKENIZER, f"tokenizers[{i}]")
        files.append((f"tokenizers[{i}].file", rec["file"]))
    if len(manifest["tokenizers"]) < len(family.text_encoders):
        raise _bad(where, "tokenizers", f"has {len(manifest['tokenizers'])} entries, the {family.name} family needs "
                                        f"{len(family.text_encoders)}")
    comps = manifest["components"]
    for name in family.required:
        if name not in comps:
            raise _bad(where, f"components.{name}", "is missing")
    for name, rec in comps.items():
        at = f"components.{name}"
        _check(where, rec, _COMPONENT, at)
        for io in ("inputs", "outputs"):
            for i, t in enumerate(rec[io]):
                _check(where, t, _TENSOR, f"{at}.{io}[{i}]")
                if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in t["shape"]):
                    raise _bad(where, f"{at}.{io}[{i}].shape", f"must list integers and dimension names, got {t['shape']!r:.60}")
        files += [(f"{at}.{k}", rec[k]) for k in ("file", "external_data", "weights", "config") if rec.get(k) is not None]
    for i, rec in enumerate(manifest.get("controlnets") or []):
        _check(where, rec, _CONTROLNET, f"controlnets[{i}]")
        for key in (rec["component"], manifest.get("controlnet_unet")):
            if key not in comps:
                raise _bad(where, f"controlnets[{i}]", f"needs the component {key!r}, which is missing")
        for j, t in enumerate(rec["residuals"]):
            _check(where, t, _TENSOR, f"controlnets[{i}].residuals[{j}]")
    for key, entry in (manifest.get("engines") or {}).items():
        _check(where, entry, _ENGINE_SET, f"engines.{key}")
        for name, rec in entry["components"].items():
            _check(where, rec, _ENGINE, f"engines.{key}.components.{name}")
            files.append((f"engines.{key}.components.{name}.file", rec["file"]))
    for key, rel in files:
        _check_inside(where, key, rel)
