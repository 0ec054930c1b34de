"""TensorRT engines as the runtime sees them (numpy + stdlib only).

- the GPU key that names an engine folder (``engines/<gpu-key>/<component>.plan``),
- the engine records in ``sdrt.json``: the checks (and refusal messages) before engines run,
- the shapes a call brings, checked against an engine's profile.

What only ``sdrt build`` needs (size ranges, profiles, reuse decisions) is in sdrt.export.profiles.
Nothing here imports TensorRT: the facts about this machine come in as a :class:`DeviceFacts`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineMismatch, ShapeOutsideProfile  # noqa: F401  (re-exported)
from .controlnet import CONTROLNET_UNET, is_controlnet
from .families import FAMILIES

ENGINES_DIR = "engines"
PLAN_SUFFIX = ".plan"
# Components whose batch is the UNet's: doubled under classifier-free guidance (and every ControlNet: is_guided).
GUIDED = ("unet", CONTROLNET_UNET)
# Components the pipeline needs for every call (the families' required ones); the VAE encoder only for
# image to image and inpainting.
REQUIRED_AT_LOAD = tuple(dict.fromkeys(c for fam in FAMILIES.values() for c in fam.required))


def is_guided(component: str) -> bool:
    """Whether ``component`` runs at the UNet's batch (2 x images under classifier-free guidance)."""
    return component in GUIDED or is_controlnet(component)


def opens_lazily(component: str, low_memory: bool = False) -> bool:
    """Whether a backend opens ``component`` on first use rather than at load: what not every call
    needs (the VAE encoder) and, with ``low_memory``, everything."""
    return low_memory or component not in REQUIRED_AT_LOAD


# -- this machine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine is tied to: the GPU model, its compute capability, the TensorRT version."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str  # trt.__version__, e.g. "10.8.0.43"

    @property
    def key(self) -> str:
        return gpu_key(self)

    def describe(self) -> str:
        return f"{self.gpu_name} (sm {self.compute_capability}, TensorRT {self.tensorrt_version})"


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9.]+", "-", str(text).lower())
    s = re.sub(r"\.{2,}", ".", s)  # never '..' in a path component
    return s.strip("-.") or "unknown"


def short_version(version: str) -> str:
    """'10.8.0.43' -> '10.8.0' (major.minor.patch; the build number stays in the record)."""
    parts = re.findall(r"\d+", str(version))
    return ".".join(parts[:3]) if parts else _slug(version)


def gpu_key(facts: DeviceFacts) -> str:
    """``nvidia-h100-80gb-hbm3_sm90_trt10.8.0``: a safe folder name for one GPU model + TensorRT."""
    cc = re.sub(r"[^0-9]", "", str(facts.compute_capability)) or "unknown"
    return f"{_slug(facts.gpu_name)}_sm{cc}_trt{_slug(short_version(facts.tensorrt_version))}"


# -- the records ------------------------------------------------------------------------------


def engine_dir(model_dir: str | Path, key: str) -> Path:
    return Path(model_dir) / ENGINES_DIR / key


def plan_relpath(key: str, component: str) -> str:
    return f"{ENGINES_DIR}/{key}/{component}{PLAN_SUFFIX}"


def onnx_hashes(component_record: dict) -> dict:
    return {
        "onnx_sha256": component_record.get("sha256"),
        "onnx_external_data_sha256": component_record.get("external_data_sha256"),
    }


def _rebuild_hint(model_dir, components: list[str] | None = None) -> str:
    comps = f" --components {','.join(components)}" if components else ""
    return f"`sdrt build {model_dir}{comps}`"


def _differences(recorded: dict, facts: DeviceFacts) -> list[str]:
    out = []
    if recorded.get("gpu_name") != facts.gpu_name:
        out.append(f"the GPU differs ({recorded.get('gpu_name')} vs {facts.gpu_name} here)")
    if str(recorded.get("compute_capability")) != str(facts.compute_capability):
        out.append(f"the compute capability differs ({recorded.get('compute_capability')} vs {facts.compute_capability} here)")
    if recorded.get("tensorrt_version") != facts.tensorrt_version:
        out.append(f"the TensorRT version differs ({recorded.get('tensorrt_version')} vs {facts.tensorrt_version} here)")
    return out


def check_engine_set(
    manifest: dict,
    facts: DeviceFacts,
    model_dir: str | Path,
    components: list[str] | None = None,
) -> dict[str, dict]:
    """The engine records for this machine, {component: record}, for ``components`` (default: all
    the pipeline needs at load; the VAE encoder is checked only when asked for).

    Raises :class:`EngineMismatch` naming what differs (GPU, compute capability, TensorRT version,
    ONNX hash, missing file) and the ``sdrt build`` command that fixes it."""
    engines = manifest.get("engines") or {}
    key = gpu_key(facts)
    if components is None:
        components = [c for c in manifest["components"] if c in REQUIRED_AT_LOAD]
    if not engines:
        raise EngineMismatch(f"{model_dir} has no TensorRT engines; build them for this GPU with {_rebuild_hint(model_dir)}")
    entry = engines.get(key)
    if entry is None:
        others = []
        for other_key, rec in engines.items():
            diffs = _differences(rec, facts)
            why = "; ".join(diffs) if diffs else f"its key {other_key} differs"
            others.append(f"{other_key}: {why}")
        raise EngineMismatch(
            f"the TensorRT engines in {model_dir} were built for another machine ({' | '.join(others)}); "
            f"this is {facts.describe()}: rebuild for it with {_rebuild_hint(model_dir)}"
        )
    diffs = _differences(entry, facts)
    if diffs:
        raise EngineMismatch(
            f"the TensorRT engines in {model_dir}/{ENGINES_DIR}/{key} cannot run here: {'; '.join(diffs)}; "
            f"rebuild with {_rebuild_hint(model_dir)} --force"
        )
    recs = entry.get("components") or {}
    out = {}
    for comp in components:
        rec = recs.get(comp)
        if rec is None:
            raise EngineMismatch(f"{model_dir} has no TensorRT engine for {comp} on this GPU; build it with {_rebuild_hint(model_dir, [comp])}")
        onnx_rec = manifest["components"].get(comp, {})
        want = onnx_hashes(onnx_rec)
        got = {k: rec.get(k) for k in want}
        if got != want:
            which = "onnx_sha256" if got["onnx_sha256"] != want["onnx_sha256"] else "onnx_external_data_sha256"
            raise EngineMismatch(
                f"the {comp} engine was built from a different ONNX ({which} {str(got[which])[:12]} recorded, "
                f"{str(want[which])[:12]} now: the model was re-exported); rebuild with {_rebuild_hint(model_dir, [comp])}"
            )
        path = Path(model_dir) / rec.get("file", "")
        if not rec.get("file") or not path.is_file():
            raise EngineMismatch(f"the {comp} engine {path} is missing; rebuild with {_rebuild_hint(model_dir, [comp])}")
        if rec.get("size_bytes") is not None and path.stat().st_size != rec["size_bytes"]:
            raise EngineMismatch(
                f"the {comp} engine {path} does not match its record in sdrt.json (an interrupted build?); "
                f"rebuild with {_rebuild_hint(model_dir, [comp])} --force"
            )
        out[comp] = rec
    return out


# -- shapes at run time -----------------------------------------------------------------------

_FLAGS = {"height": "height", "width": "width", "latent_height": "height", "latent_width": "width"}


def check_shapes(
    component: str,
    component_record: dict,
    profile: dict,
    shapes: dict[str, tuple],
    *,
    model_dir: str | Path = "DIR",
    vae_scale_factor: int = 8,
) -> None:
    """Raise :class:`ShapeOutsideProfile` when ``shapes`` fall outside the engine's profile; the
    message names the size (height/width in pixels, batch in images), the profile's range and the
    ``sdrt build`` flags that would cover it."""
    specs = {t["name"]: t["shape"] for t in component_record["inputs"]}
    for name, shape in shapes.items():
        prof = profile.get(name)
        if prof is None:
            continue
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(prof["min"]):
            raise ShapeOutsideProfile(
                f"{component} input {name} has shape {shape}, the engine expects {len(prof['min'])} dimensions"
            )
        dims = specs.get(name, [None] * len(shape))
        for axis, v in enumerate(shape):
            lo, hi = prof["min"][axis], prof["max"][axis]
            if lo <= v <= hi:
                continue
            d = dims[axis] if axis < len(dims) else None
            raise ShapeOutsideProfile(_outside_message(component, name, d, v, lo, hi, model_dir, vae_scale_factor))


def _outside_message(component, name, dim, v, lo, hi, model_dir, f) -> str:
    if dim in _FLAGS:
        size = _FLAGS[dim]
        scale = f if dim.startswith("latent_") else 1
        val, lo_px, hi_px = v * scale, lo * scale, hi * scale
        if lo == hi:  # a --static engine: build that one size instead
            flag = f"--{size} {val} --static (or a range without --static)"
        else:
            flag = f"--max-{size} {val}" if val > hi_px else f"--min-{size} {val}"
        return (
            f"{size} {val} is outside the {component} engine's profile {lo_px}..{hi_px}; "
            f"rebuild with sdrt build {model_dir} {flag}"
        )
    if dim == "batch":
        if is_guided(component):
            images = math.ceil(v / 2)
            what = f"batch {v} (the UNet runs 2 x images under classifier-free guidance)"
            rng = f"{lo}..{hi} (up to {hi // 2} images with guidance)"
        else:
            images, what, rng = v, f"batch {v}", f"{lo}..{hi}"
        # below the minimum only happens with --static (min batch is 1 otherwise)
        flag = f"--max-batch {images}" if v > hi else "without --static"
        return f"{what} is outside the {component} engine's profile {rng}; rebuild with sdrt build {model_dir} {flag}"
    return (
        f"{component} input {name} dimension {dim!r} = {v} is outside the engine's profile {lo}..{hi}; "
        f"rebuild with sdrt build {model_dir}"
    )
