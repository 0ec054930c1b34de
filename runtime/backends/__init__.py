"""Engine backends: named numpy arrays in, named numpy arrays out (see base.Engine).

``select`` turns a backend name into one engine per component of a model directory:
``auto`` (TensorRT when a usable engine for this GPU is present, else ONNX Runtime CUDA when
onnxruntime-gpu and a GPU are present, else the CPU), ``ort-cpu``, ``ort-cuda``, ``tensorrt``,
``openvino`` (OpenVINO on the CPU); each at a ``precision`` (runtime/precision.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError
from .base import BackendUnavailable, Engine

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt", "openvino")
_ALIASES = {"cpu": "ort-cpu", "cuda": "ort-cuda", "onnxruntime": "ort-cpu", "trt": "tensorrt", "ov": "openvino"}


class LazyEngine:
    """Opens its engine on first use: the VAE encoder costs nothing until an image-to-image call.
    Weights set while it is closed (LoRA under low_memory) are given to each engine it opens."""

    def __init__(self, name: str, open_fn):
        self.name, self._open, self._engine = name, open_fn, None
        self._weights: dict = {}

    def _get(self):
        if self._engine is None:
            self._engine = self._open(weights=self._weights)
        return self._engine

    def set_weights(self, weights: dict) -> None:
        self._weights = dict(weights)
        if self._engine is not None:
            self._engine.set_weights(self._weights)

    @property
    def input_names(self):
        return self._get().input_names

    @property
    def output_names(self):
        return self._get().output_names

    def __call__(self, **inputs):
        return self._get()(**inputs)

    def close(self):
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def resolve_backend(name: str, model_dir: Path | None = None, manifest: dict | None = None) -> str:
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "tensorrt":
        from .tensorrt import tensorrt_records

        tensorrt_records(model_dir, manifest, strict=True)  # BackendUnavailable says what is missing
        return name
    if name == "openvino":
        from .openvino import openvino_available

        if not openvino_available():
            raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'sdrt[openvino]'")
        return name
    if name == "auto":
        from .tensorrt import tensorrt_records

        if tensorrt_records(model_dir, manifest, strict=False) is not None:
            return "tensorrt"
        from .onnxruntime import cuda_available

        return "ort-cuda" if cuda_available() else "ort-cpu"
    return name


def auto_cpu_backend(precision: str, manifest: dict, flags: set[str] | None = None) -> str:
    """The backend ``auto`` picks for a reduced precision, which runs on the CPU only: the one measured faster
    (``sdrt bench``, sd1-full at 256x256). bf16: OpenVINO, the only one with bf16 kernels. int8: OpenVINO for
    an OpenVINO IR (``sdrt quantize --method nncf``), and for a QDQ graph where the CPU has VNNI (AVX-512: 779
    against 1022 ms a UNet step, and its VAE in bf16); ONNX Runtime on a CPU without VNNI (AVX2: 1.40 against
    1.79 s), or where OpenVINO is not installed."""
    from ..precision import isa, needs_openvino

    if precision == "bf16" or needs_openvino(manifest, precision):
        return "openvino"
    from .openvino import openvino_available

    return "openvino" if isa(flags)["vnni"] and openvino_available() else "ort-cpu"


def select(backend: str, model_dir: Path, manifest: dict, threads: int | None = None,
           low_memory: bool = False, cuda_graph: bool = False, precision: str = "fp32") -> tuple[str, dict]:
    """(resolved backend name, {component: Engine}) for every component in the manifest.
    ``precision``: fp32, bf16 or int8 (runtime/precision.py), refused in one line where the backend or this
    CPU cannot run it fast; ``auto`` with bf16 or int8 picks a CPU backend (auto_cpu_backend).
    What only some tasks need (the VAE encoder) opens on first use (engines.opens_lazily);
    ``low_memory`` opens every engine lazily (the pipeline closes each after its stage).
    ``cuda_graph`` (TensorRT): capture the UNet call once and replay it each step."""
    from ..engines import opens_lazily
    from .onnxruntime import OrtEngine, cuda_available

    from ..precision import FixedWeights, check, component_records

    if _ALIASES.get(backend, backend) == "auto" and precision != "fp32":
        backend = auto_cpu_backend(precision, manifest)
    kind = resolve_backend(backend, model_dir, manifest)
    check(kind, precision)
    if kind == "tensorrt":
        from .tensorrt import open_engines, tensorrt_records

        strict = _ALIASES.get(backend, backend) == "tensorrt"
        ort = "cuda" if not strict and cuda_available() else "cpu"

        def fallback(name, weights=None):  # auto: a component without a usable engine runs on ONNX Runtime
            return OrtEngine(name, model_dir, manifest["components"][name], provider=ort, threads=threads,
                             weights=weights)

        records = tensorrt_records(model_dir, manifest, strict=True)
        return kind, open_engines(model_dir, manifest, records, cuda_graph=cuda_graph, low_memory=low_memory,
                                  fallback=None if strict else fallback)
    provider = "cuda" if kind == "ort-cuda" else "cpu"
    if kind == "openvino":
        from .openvino import OvEngine

        def make(name, rec, weights):
            return OvEngine(name, model_dir, rec, threads=threads, precision=precision, weights=weights)
    else:
        def make(name, rec, weights):
            return OrtEngine(name, model_dir, rec, provider=provider, threads=threads, weights=weights)
    engines, now = {}, {}
    for name, rec in component_records(model_dir, manifest, precision, kind).items():
        def open_engine(weights=None, name=name, rec=rec):
            if rec.get("precision") != "int8":
                return make(name, rec, weights)
            engine = FixedWeights(make(name, rec, None))
            engine.set_weights(weights or {})  # LoRA on a quantized graph: refused
            return engine

        if opens_lazily(name, low_memory):
            engines[name] = LazyEngine(name, open_engine)
        else:
            now[name] = open_engine
    return kind, {**open_all(now), **engines}


def cache_states(engines: dict) -> dict[str, str]:
    """{component: its engine's cache state (base.Engine.cache_state)} for the engines opened that keep one (a
    lazy engine not yet opened, or an engine without a cache, is left out)."""
    states = {}
    for name, engine in engines.items():
        while getattr(engine, "_engine", None) is not None:  # LazyEngine, precision.FixedWeights
            engine = engine._engine
        state = getattr(engine, "cache_state", None)
        if isinstance(state, str) and state:
            states[name] = state
    return states


def open_all(openers: dict) -> dict:
    """{name: opener()} with the openers run side by side: ONNX Runtime and OpenVINO let go of the GIL while
    they make a session (reading the graph, laying out and packing its weights), so the text encoder and the
    VAE decoder open while the UNet does (sd1-full, ort-cpu, 2 cores: 1.8-2.6 s against 3.5-4.7 s one after
    another). A failure closes those that opened and raises the first component's error."""
    if len(openers) < 2:
        return {name: opener() for name, opener in openers.items()}
    with ThreadPoolExecutor(len(openers), thread_name_prefix="sdrt-open") as pool:
        futures = {name: pool.submit(opener) for name, opener in openers.items()}
    opened, error = {}, None
    for name, future in futures.items():
        try:
            opened[name] = future.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every engine is accounted for
            error = error or e
    if error is not None:
        for engine in opened.values():
            engine.close()
        raise error
    return opened


__all__ = ["BACKENDS", "BackendUnavailable", "Engine", "LazyEngine", "cache_states", "open_all", "resolve_backend",
           "select"]
