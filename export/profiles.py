"""Optimization profiles for ``sdrt build`` (what only the builder needs; the runtime checks and
runs engines with sdrt.runtime.engines).

- the user's size ranges, validated, with the flag at fault named,
- the optimization profile of each component, from those ranges and the manifest's named dimensions,
- whether an engine already built can be reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.engines import is_guided, onnx_hashes
from sdrt.runtime.errors import SdrtError


# The UNet's text conditioning: 77 tokens (one chunk) at min and opt, up to this many chunks at max, for
# prompts longer than the text encoder's 77 tokens (sdrt.runtime.prompts).
MAX_TEXT_CHUNKS = 4


class RangeError(SdrtError, ValueError):
    """Size ranges for ``sdrt build`` that cannot make a profile; the message says which and why."""


@dataclass(frozen=True)
class Ranges:
    """(min, opt, max) per user-level size: image pixels for height/width, images per call for batch."""

    height: tuple[int, int, int]
    width: tuple[int, int, int]
    batch: tuple[int, int, int]
    static: bool = False

    def as_dict(self) -> dict:
        return {"height": list(self.height), "width": list(self.width), "batch": list(self.batch), "static": self.static}


def _round_down(v: int, m: int) -> int:
    return max(m, v // m * m)


def _round_up(v: int, m: int) -> int:
    return max(m, -(-v // m) * m)


def resolve_ranges(
    manifest: dict,
    *,
    height: int | None = None,
    width: int | None = None,
    min_height: int | None = None,
    max_height: int | None = None,
    min_width: int | None = None,
    max_width: int | None = None,
    batch: int | None = None,
    max_batch: int | None = None,
    static: bool = False,
) -> Ranges:
    """The user's ranges, filled with defaults and validated (before anything is built).

    Defaults: opt = the model's native resolution, min = opt/2, max = 1.5 x opt (multiples of 8);
    batch 1, max batch = batch. ``static`` makes min = opt = max for every size. Raises
    :class:`RangeError` with a message naming the flag at fault.
    """
    native = int(manifest.get("native_resolution", 512))
    mult = 8
    sizes = {}
    for dim, opt, lo, hi in (("height", height, min_height, max_height), ("width", width, min_width, max_width)):
        flag = f"--{dim}"
        for name, v in ((flag, opt), (f"--min-{dim}", lo), (f"--max-{dim}", hi)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise RangeError(f"{name} must be a positive integer, got {v!r}")
            if v % mult:
                lower = _round_down(v, mult)
                raise RangeError(f"{name} {v} is not a multiple of {mult}; use {lower} or {lower + mult}")
        if static:
            if lo is not None or hi is not None:
                raise RangeError(f"--static builds one shape: give {flag} only, not --min-{dim}/--max-{dim}")
            o = native if opt is None else opt
            sizes[dim] = (o, o, o)
            continue
        o = native if opt is None else opt
        if opt is None:  # the native size as default opt, kept inside an explicit range
            if lo is not None:
                o = max(o, lo)
            if hi is not None:
                o = min(o, hi)
        mn = lo if lo is not None else min(o, _round_down(o // 2, mult))
        mx = hi if hi is not None else max(o, _round_up(o * 3 // 2, mult))
        if mn > o:
            raise RangeError(f"--min-{dim} {mn} is larger than {flag} {o}; min <= opt <= max is required")
        if o > mx:
            raise RangeError(f"{flag} {o} is larger than --max-{dim} {mx}; min <= opt <= max is required")
        sizes[dim] = (mn, o, mx)
    for name, v in (("--batch", batch), ("--max-batch", max_batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise RangeError(f"{name} must be a positive integer, got {v!r}")
    b = 1 if batch is None else batch
    if static:
        if max_batch is not None and max_batch != b:
            raise RangeError(f"--static builds one shape: --max-batch {max_batch} differs from --batch {b}")
        batches = (b, b, b)
    else:
        mb = b if max_batch is None else max_batch
        if b > mb:
            raise RangeError(f"--batch {b} is larger than --max-batch {mb}; min <= opt <= max is required")
        batches = (1, b, mb)
    return Ranges(sizes["height"], sizes["width"], batches, static)


def dim_ranges(manifest: dict, component: str, ranges: Ranges) -> dict[str, tuple[int, int, int]]:
    """Named dimension -> (min, opt, max) for one component.

    Latent dims are the image dims divided by the VAE scale factor. The UNet's batch is doubled for
    classifier-free guidance (opt and max; min stays at the single batch so guidance-free calls,
    guidance_scale <= 1, still fit, except with --static, which builds exactly 2 x batch). The text length
    is one chunk of the tokenizer's max length (77), up to MAX_TEXT_CHUNKS of them (one with --static)."""
    f = int(manifest.get("vae_scale_factor", 8))
    b = ranges.batch
    if is_guided(component):
        b = (2 * b[0], 2 * b[1], 2 * b[2]) if ranges.static else (b[0], 2 * b[1], 2 * b[2])
    chunk = int(manifest.get("tokenizers", [{}])[0].get("max_length", 77))
    return {
        "batch": b,
        "text_length": (chunk, chunk, chunk if ranges.static else chunk * MAX_TEXT_CHUNKS),
        "height": ranges.height,
        "width": ranges.width,
        "latent_height": tuple(v // f for v in ranges.height),
        "latent_width": tuple(v // f for v in ranges.width),
    }


def component_profile(manifest: dict, component: str, ranges: Ranges) -> dict[str, dict[str, list[int]]]:
    """{input name: {"min": shape, "opt": shape, "max": shape}} for one component's optimization profile.
    Fixed dimensions (the text encoder's sequence length, channels) are the same in all three."""
    rec = manifest["components"][component]
    dims = dim_ranges(manifest, component, ranges)
    profile = {}
    for t in rec["inputs"]:
        shapes = {"min": [], "opt": [], "max": []}
        for d in t["shape"]:
            if isinstance(d, int):
                for k in shapes:
                    shapes[k].append(d)
            elif d in dims or _derived(d, dims):
                for i, k in enumerate(("min", "opt", "max")):
                    shapes[k].append(int((dims.get(d) or _derived(d, dims))[i]))
            else:
                raise RangeError(f"{component} input {t['name']} has a dimension {d!r} that sdrt build does not know how to size")
        profile[t["name"]] = shapes
    return profile


def _derived(d: str, dims: dict) -> tuple | None:
    """A dimension named ``latent_height/k`` (a UNet feature map after stride-2 downsamplings, as ControlNet
    residuals are: rounded up) from its base's range; None for any other name."""
    base, _, k = d.partition("/")
    if base not in dims or not k.isdigit() or int(k) < 1:
        return None
    return tuple(-(-v // int(k)) for v in dims[base])


def profiles(manifest: dict, components: list[str], ranges: Ranges) -> dict[str, dict]:
    return {c: component_profile(manifest, c, ranges) for c in components}


def reuse_decision(
    existing: dict | None,
    *,
    component_record: dict,
    profile: dict,
    precision: str,
    model_dir: str | Path,
    force: bool = False,
) -> tuple[bool, str]:
    """(reuse?, why): an engine already built for this key is reused when it came from the same ONNX
    (sha256 of graph and external data), with the same profile and precision, and its file is there."""
    if force:
        return False, "--force"
    if not existing:
        return False, "not built yet"
    if {k: existing.get(k) for k in ("onnx_sha256", "onnx_external_data_sha256")} != onnx_hashes(component_record):
        return False, "the ONNX changed since the last build"
    if existing.get("profile") != profile:
        return False, "the profile changed"
    if existing.get("precision") != precision:
        return False, f"the precision changed ({existing.get('precision')} -> {precision})"
    path = Path(model_dir) / existing.get("file", "")
    if not existing.get("file") or not path.is_file():
        return False, "the engine file is missing"
    if existing.get("size_bytes") is not None and path.stat().st_size != existing["size_bytes"]:
        return False, "the engine file does not match its record"
    return True, "up to date"
