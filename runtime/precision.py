"""Precision as an explicit choice: ``Pipeline.load(path, backend=..., precision="fp32"|"bf16"|"int8")``.

- ``fp32``: the graphs as exported (the default, and the parity path).
- ``bf16``: float ops in bfloat16, on OpenVINO, where the CPU has AVX-512 BF16 or AMX (elsewhere bf16 runs
  emulated, slower than fp32: refused in one line instead).
- ``int8``: the UNet's int8 graph that ``sdrt quantize`` wrote into the model directory (QDQ: ONNX Runtime
  and OpenVINO both run it with int8 kernels), recorded in the manifest as ``components.unet.variants.int8``;
  the other components stay fp32.

Each is measured for quality against fp32 (PSNR in ``sdrt bench``), not held to the 2e-3 parity tolerance.
"""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

from .errors import ConfigError, ModelDirError

PRECISIONS = ("fp32", "bf16", "int8")
INT8_COMPONENTS = ("unet",)  # what `sdrt quantize` quantizes
# backend -> the precisions it runs, and why not the others
_OFFERED = {
    "ort-cpu": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "ort-cuda": ("fp32",),
    "tensorrt": ("fp32",),
}
_WHY_NOT = {
    ("ort-cpu", "bf16"): "ONNX Runtime has no bf16 CPU kernels for these graphs; use --backend openvino --precision bf16",
    ("ort-cuda", "bf16"): "bf16 is a CPU precision here; on a GPU export with --fp16 instead",
    ("tensorrt", "bf16"): "bf16 is a CPU precision here; build fp16 engines (`sdrt export --fp16`, `sdrt build`) instead",
    ("ort-cuda", "int8"): "int8 graphs run on the CPU backends (ort-cpu, openvino); on a GPU export with --fp16 instead",
    ("tensorrt", "int8"): "int8 graphs run on the CPU backends (ort-cpu, openvino); TensorRT engines take their "
                          "precision from `sdrt build`",
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa(flags: set[str] | None = None) -> dict:
    """What decides CPU speed at each precision: AVX2, AVX-512, VNNI (int8 dot products), BF16, AMX."""
    f = cpu_flags() if flags is None else flags
    return {"avx2": "avx2" in f, "avx512": "avx512f" in f,
            "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & f),
            "bf16": bool({"avx512_bf16", "amx_bf16"} & f), "amx": bool({"amx_tile", "amx_bf16", "amx_int8"} & f)}


def check(backend: str, precision: str, flags: set[str] | None = None) -> None:
    """ConfigError in one line when ``backend`` cannot run ``precision`` (fast) on this machine."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in _OFFERED.get(backend, ("fp32",)):
        raise ConfigError(f"precision {precision} is not offered on the {backend} backend: "
                          + _WHY_NOT.get((backend, precision), f"use one of {', '.join(_OFFERED.get(backend, ('fp32',)))}"))
    if precision == "bf16" and not isa(flags)["bf16"]:
        raise ConfigError("this CPU cannot run bf16 fast (no AVX-512 BF16 or AMX: it would be emulated, slower "
                          "than fp32); use --precision fp32, or int8 (`sdrt quantize`)")


def is_inside(rel) -> bool:
    """Whether ``rel`` is a relative path that stays inside the model directory (as written)."""
    if not isinstance(rel, str) or not rel:
        return False
    p = PureWindowsPath(rel)  # splits on slashes and backslashes alike; its anchor is set for /x, \x and C:x
    return not p.anchor and ".." not in p.parts


def _variant(rec: dict, precision: str):
    """The record of ``precision``'s graph of a component (``components.NAME.variants``), or None."""
    return ((rec or {}).get("variants") or {}).get(precision)


def is_openvino_ir(variant) -> bool:
    """Whether a variant is an OpenVINO IR (`sdrt quantize --method nncf`), which only the openvino backend runs."""
    return isinstance(variant, dict) and variant.get("format", "onnx") == "openvino"


def needs_openvino(manifest: dict, precision: str) -> bool:
    """Whether ``precision``'s graphs in the model directory include an OpenVINO IR."""
    comps = manifest.get("components", {})
    return precision == "int8" and any(is_openvino_ir(_variant(comps.get(n), precision)) for n in INT8_COMPONENTS)


def component_records(model_dir: Path, manifest: dict, precision: str, backend: str = "ort-cpu") -> dict[str, dict]:
    """{component: the record to open} for ``precision`` on ``backend``: for int8, the UNet's int8 variant in
    place of its fp32 graph (ModelDirError saying to run `sdrt quantize` when the model directory has none)."""
    comps = dict(manifest["components"])
    if precision != "int8":
        return comps
    for name in INT8_COMPONENTS:
        rec = comps.get(name)
        if rec is None:
            continue
        variant = _variant(rec, "int8")
        if not isinstance(variant, dict) or not isinstance(variant.get("file"), str):
            raise ModelDirError(f"{model_dir} has no int8 {name}; make one with `sdrt quantize {model_dir}` first")
        for key in ("file", "external_data"):
            rel = variant.get(key)
            if rel is not None and not is_inside(rel):
                raise ModelDirError(f"sdrt.json: components.{name}.variants.int8.{key} {rel!r} is not a path inside "
                                    "the model directory; run `sdrt quantize` again")
        if is_openvino_ir(variant) and backend != "openvino":
            raise ModelDirError(f"{model_dir}'s int8 {name} is an OpenVINO IR (`sdrt quantize --method nncf`), which "
                                f"the {backend} backend cannot run: use --backend openvino, or quantize again with "
                                "--method ort-static")
        comps[name] = {**rec, **{k: variant.get(k) for k in ("file", "external_data", "sha256", "external_data_sha256",
                                                             "size_bytes")}, "precision": "int8"}
        comps[name].pop("weights", None)  # the weight map points into the fp32 graph: no LoRA on the int8 one
    return comps


class FixedWeights:
    """An engine of a quantized graph: its weights are not the exported ones, so LoRA (set_weights) is refused."""

    def __init__(self, engine):
        self._engine = engine
        self.name = engine.name

    @property
    def input_names(self):
        return self._engine.input_names

    @property
    def output_names(self):
        return self._engine.output_names

    def set_weights(self, weights: dict) -> None:
        if weights:
            raise ConfigError(f"LoRA cannot be applied to the int8 {self.name} (its weights are quantized); "
                              "load the model with precision fp32 (--precision fp32) to use LoRA")

    def __call__(self, **inputs):
        return self._engine(**inputs)

    def close(self) -> None:
        self._engine.close()
