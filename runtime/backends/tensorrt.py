"""TensorRT engines behind the Engine interface: named numpy arrays in, named numpy arrays out.

Plans come from ``sdrt build`` (``engines/<gpu-key>/<component>.plan``, recorded in sdrt.json).
TensorRT and cuda-python are imported lazily, only when this backend is used: importing sdrt never
needs them, and nothing here touches torch.

- Device memory and the stream come from cuda-python's runtime bindings (cudart).
- The stages run one after another, so all engines share one device scratch allocation sized to
  the largest need (execution contexts created with the USER_MANAGED allocation strategy).
- Shapes are set per call (``set_input_shape``) after checking them against the engine's recorded
  profile, so a size the engine was not built for is a clear error naming the ``sdrt build`` flags.
- Only what changed crosses the bus: an input passed as the same host array object as in the
  previous call (the text embeddings, every denoising step) is not uploaded again.
- ``cuda_graph=True`` (the UNet with ``--cuda-graph``): the call is captured once into a CUDA graph
  and replayed for later calls with the same shapes.
- ``set_weights`` (engines from ``sdrt build --refittable``): named weights (ONNX initializer names)
  replaced in place through ``trt.Refitter``, e.g. LoRA deltas, without a rebuild.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np

from ..engines import DeviceFacts, EngineMismatch, check_engine_set, check_shapes, opens_lazily
from ..errors import ModelDirError
from .base import BackendUnavailable

INSTALL = "pip install 'sdrt[tensorrt]'"


class RefitError(EngineMismatch):
    """Weights a TensorRT engine cannot take (not refittable, unknown name, wrong size or type, weights
    it needs together with the given ones: ``missing``); the message says which and what to do."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


def _first(names, n: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _missing_message(what: str, missing: list[str]) -> str:
    pkgs = " and ".join(missing)
    meanwhile = "; use --backend ort-cpu or ort-cuda meanwhile" if "backend" in what else ""
    return (
        f"{what} needs {pkgs}, which {'is' if len(missing) == 1 else 'are'} not installed: {INSTALL} "
        f"(TensorRT needs an NVIDIA GPU){meanwhile}"
    )


def import_tensorrt(what: str = "the TensorRT backend"):
    """(tensorrt, cudart) or BackendUnavailable naming what is missing and how to install it."""
    missing = []
    trt = cudart = None
    try:
        import tensorrt as trt  # noqa: F811
    except Exception:  # ImportError, or a broken install (missing libnvinfer)
        missing.append("the tensorrt package")
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except Exception:
        try:
            from cuda import cudart  # older cuda-python
        except Exception:
            missing.append("the cuda-python package")
    if missing:
        raise BackendUnavailable(_missing_message(what, missing))
    return trt, cudart


def _check(cudart, result, what: str):
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err = result[0] if isinstance(result, tuple) else result
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            text = cudart.cudaGetErrorString(err)[1].decode()
        except Exception:
            text = str(err)
        raise RuntimeError(f"{what} failed: {text}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else (result[1:] if len(result) > 2 else None)
    return None


_facts_cache: list = []


def device_facts(what: str = "the TensorRT backend") -> DeviceFacts:
    """This machine's GPU name, compute capability and TensorRT version; BackendUnavailable when
    TensorRT/cuda-python are missing or no NVIDIA GPU is visible."""
    if _facts_cache:
        return _facts_cache[0]
    trt, cudart = import_tensorrt(what)
    count = cudart.cudaGetDeviceCount()
    if count[0] != cudart.cudaError_t.cudaSuccess or count[1] < 1:
        meanwhile = "; use --backend ort-cpu meanwhile" if "backend" in what else ""
        raise BackendUnavailable(f"{what} needs an NVIDIA GPU, and none is visible here{meanwhile}")
    dev = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    prop = _check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    facts = DeviceFacts(str(name).strip(), f"{prop.major}.{prop.minor}", str(trt.__version__))
    _facts_cache.append(facts)
    return facts


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def tensorrt_records(model_dir, manifest: dict | None, *, strict: bool, facts: DeviceFacts | None = None) -> dict | None:
    """The engine records this machine can run, {component: record}, or why not.

    ``strict`` (``backend="tensorrt"``): BackendUnavailable naming what is missing (package, GPU)
    or why the recorded engines are refused (GPU, compute capability, TensorRT version, ONNX hash),
    with the ``sdrt build`` command. Not strict (``auto``): None, quietly when TensorRT, a GPU or
    engines are absent, with one warning when engines are there but cannot be used here.
    The records of optional components (the VAE encoder: image to image only; the ControlNet graphs) are included
    when they are usable."""
    if not strict and (manifest is None or not manifest.get("engines")):
        return None  # nothing built: ONNX Runtime, without importing TensorRT
    try:
        facts = facts or device_facts()
    except BackendUnavailable:
        if strict:
            raise
        return None
    if manifest is None:
        return {}
    try:
        records = check_engine_set(manifest, facts, model_dir)
    except EngineMismatch as e:
        if strict:
            raise BackendUnavailable(str(e)) from e
        _warn_once(f"{e}; using ONNX Runtime instead")
        return None
    for comp in [c for c in manifest["components"] if c not in records]:
        try:
            records.update(check_engine_set(manifest, facts, model_dir, [comp]))
        except EngineMismatch:
            pass
    return records


class _Session:
    """What the engines of one pipeline share: the TensorRT runtime, one stream, one scratch buffer."""

    def __init__(self):
        self.trt, self.cudart = import_tensorrt()
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = None
        self.scratch_ptr, self.scratch_size = 0, 0
        self.generation = 0  # bumped when the scratch moves: captured CUDA graphs are then stale
        self._contexts: list = []
        self._open()

    def _open(self) -> None:
        if self.stream is None:
            self.stream = _check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
            self.stream_handle = int(self.stream)

    def malloc(self, nbytes: int) -> int:
        try:
            return int(_check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), 256)), "cudaMalloc"))
        except RuntimeError as e:
            raise RuntimeError(f"cannot allocate {nbytes / 2**20:.1f} MiB of GPU memory: {e}") from e

    def free(self, ptr: int) -> None:
        if ptr:
            self.cudart.cudaFree(ptr)

    def synchronize(self) -> None:
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def attach(self, context, need: int) -> None:
        """Give ``context`` the shared scratch, growing it (for every context) if it needs more."""
        self._open()  # again, after every engine was closed (low-memory pipelines close each stage)
        need = max(int(need), 256)
        if need > self.scratch_size:
            if self.scratch_ptr:
                self.synchronize()
            new = self.malloc(need)
            self.free(self.scratch_ptr)
            self.scratch_ptr, self.scratch_size = new, need
            self.generation += 1
            for ctx in self._contexts:
                ctx.set_device_memory(self.scratch_ptr, self.scratch_size)
        context.set_device_memory(self.scratch_ptr, self.scratch_size)
        self._contexts.append(context)

    def detach(self, context) -> None:
        self._contexts = [c for c in self._contexts if c is not context]
        if not self._contexts:
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.synchronize()
            except RuntimeError:
                pass
            self.free(self.scratch_ptr)
            self.scratch_ptr, self.scratch_size = 0, 0
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class TrtEngine:
    """One component's TensorRT plan with its execution context and device I/O buffers."""

    def __init__(self, name: str, model_dir: Path, record: dict, component_record: dict, session: _Session,
                 *, vae_scale_factor: int = 8, cuda_graph: bool = False):
        trt = session.trt
        self.name, self.model_dir, self.record, self._session = name, Path(model_dir), record, session
        self._component_record, self._vsf = component_record, vae_scale_factor
        self._profile = record.get("profile") or {}
        path = self.model_dir / record["file"]
        plan = path.read_bytes()
        if record.get("sha256") and hashlib.sha256(plan).hexdigest() != record["sha256"]:  # none: an older build
            raise ModelDirError(
                f"{path} does not match the sha256 `sdrt build` recorded for it (damaged or replaced); "
                f"rebuild it with `sdrt build {self.model_dir} --components {name} --force`"
            )
        engine = session.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT could not load {path} (built by another TensorRT version, or damaged); "
                f"rebuild it with `sdrt build {self.model_dir} --components {name} --force`"
            )
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {path}")
        need = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1; 11 has only this one
        session.attach(self.context, need if need is not None else engine.device_memory_size)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._shapes: dict[str, tuple] = {}
        self._held: dict[str, tuple] = {}  # input name -> (host array object given, contiguous copy uploaded)
        self.cuda_graph = cuda_graph
        self._graph = self._graph_exec = None
        self._graph_key = None
        self.graph_replays = 0
        self._weight_names: list[str] | None = None  # refittable weights, asked for on first use
        self._set_names: set[str] = set()  # weights set_weights replaced (restored when no longer given)
        self._weight_map = None  # the component's weight map, read when a weight is restored

    # -- buffers -------------------------------------------------------------------------------

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self._session.synchronize()
                self._session.free(ptr)
            ptr, cap = self._session.malloc(nbytes), max(int(nbytes), 256)
            self._buffers[name] = (ptr, cap)
            self._held.pop(name, None)
        return ptr

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        cudart = self._session.cudart
        _check(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self._session.stream), "cudaMemcpyAsync")

    # -- the call ------------------------------------------------------------------------------

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise ValueError(f"{self.name} takes inputs {self.input_names}; missing {missing}, unknown {unknown}")
        shapes = {n: tuple(np.shape(inputs[n])) for n in self.input_names}
        check_shapes(self.name, self._component_record, self._profile, shapes,
                     model_dir=self.model_dir, vae_scale_factor=self._vsf)
        s, cudart, ctx = self._session, self._session.cudart, self.context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, shape in shapes.items():
            if self._shapes.get(n) != shape:
                if ctx.set_input_shape(n, shape) is False:
                    raise ValueError(f"TensorRT refused shape {shape} for {self.name} input {n}")
                self._shapes[n] = shape
        for n in self.input_names:
            given = inputs[n]
            held = self._held.get(n)
            if held is not None and held[0] is given:
                continue  # the same host array as last call: already on the device
            host = np.ascontiguousarray(given, dtype=self._dtype[n])
            ptr = self._buffer(n, host.nbytes)
            self._copy(ptr, host.ctypes.data, host.nbytes, h2d)
            self._held[n] = (given, host)
        out_shapes = {}
        for n in self.output_names:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {self.name} output {n}: {shape}")
            out_shapes[n] = shape
            self._buffer(n, math.prod(shape) * self._dtype[n].itemsize)
        for n, (ptr, _) in self._buffers.items():
            ctx.set_tensor_address(n, ptr)
        self._execute(shapes)
        outs = {}
        for n, shape in out_shapes.items():
            host = np.empty(shape, dtype=self._dtype[n])
            if host.nbytes:
                self._copy(host.ctypes.data, self._buffers[n][0], host.nbytes, d2h)
            outs[n] = host
        s.synchronize()
        return {n: (a.astype(np.float32) if a.dtype == np.float16 else a) for n, a in outs.items()}

    def _execute(self, shapes: dict) -> None:
        s, cudart, ctx = self._session, self._session.cudart, self.context
        key = (tuple(sorted(shapes.items())), tuple(sorted(self._buffers.items())), s.generation)
        if self.cuda_graph and self._graph_exec is not None and key == self._graph_key:
            _check(cudart, cudart.cudaGraphLaunch(self._graph_exec, s.stream), "cudaGraphLaunch")
            self.graph_replays += 1
            return
        if not ctx.execute_async_v3(s.stream_handle):
            raise RuntimeError(f"TensorRT failed to run the {self.name} engine")
        if self.cuda_graph:
            self._capture(key)

    def _capture(self, key) -> None:
        """Record one enqueue into a CUDA graph (after a regular run, which does TensorRT's
        shape-dependent setup), to replay while shapes and buffers stay the same."""
        s, cudart = self._session, self._session.cudart
        self._drop_graph()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        try:
            _check(cudart, cudart.cudaStreamBeginCapture(s.stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(s.stream_handle)
            graph = _check(cudart, cudart.cudaStreamEndCapture(s.stream), "cudaStreamEndCapture")
            if not ok:
                raise RuntimeError("enqueue during capture failed")
            self._graph = graph
            self._graph_exec = _check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            self._graph_key = key
        except RuntimeError as e:
            self._drop_graph()
            self.cuda_graph = False
            warnings.warn(f"CUDA graph capture of the {self.name} engine failed ({e}); running it without a graph")

    def _drop_graph(self) -> None:
        cudart = self._session.cudart
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = self._graph_key = None

    # -- refit -------------------------------------------------------------------------------

    @property
    def refittable(self) -> bool:
        return bool(getattr(self.engine, "refittable", False))

    def _refitter(self):
        if not self.refittable:
            raise RefitError(
                f"the {self.name} engine {self.model_dir / self.record['file']} is not refittable: rebuild it with "
                f"`sdrt build {self.model_dir} --components {self.name} --refittable`"
            )
        return self._session.trt.Refitter(self.engine, self._session.logger)

    def weight_names(self, refitter=None) -> list[str]:
        """The names (ONNX initializer names) of the weights :meth:`set_weights` can replace."""
        if self._weight_names is None:
            self._weight_names = list((refitter or self._refitter()).get_all_weights())
        return list(self._weight_names)

    def set_weights(self, weights: dict) -> None:
        """Run with these weights (ONNX initializer names -> arrays of the initializer's size, fp32 or fp16,
        cast to the engine's weight type, or functions making them) instead of the exported ones; a weight
        set before and absent now gets its exported value back (read through the component's weight map).
        Refitted in place; the other weights keep their values.

        RefitError before anything is changed when the engine is not refittable, a name is not one of its
        weights, a size or type disagrees, or TensorRT needs weights fused with these (``missing``) too;
        after, when refit_cuda_engine fails. A captured CUDA graph is dropped (recaptured on the next call)."""
        restore = self._set_names - set(weights)
        weights = {**{n: self._exported(n) for n in restore},
                   **{n: v() if callable(v) else v for n, v in weights.items()}}
        if not weights:
            return
        self._refit(weights)
        self._set_names = set(weights) - restore

    def _refit(self, weights: dict[str, np.ndarray]) -> None:
        trt = self._session.trt
        refitter = self._refitter()
        known = set(self.weight_names(refitter))
        unknown = [n for n in weights if n not in known]
        if unknown:
            raise RefitError(f"the {self.name} engine has no refittable weight(s) {_first(unknown)} "
                             f"({len(known)} weights are; see weight_names())")
        held = []  # TensorRT reads these host arrays during refit_cuda_engine: keep them alive until then
        for name, value in weights.items():
            proto = refitter.get_weights_prototype(name)
            a = np.asarray(value)
            try:
                want = np.dtype(trt.nptype(proto.dtype))
            except TypeError:
                raise RefitError(f"{self.name} weight {name} is {proto.dtype}, which numpy cannot give") from None
            if a.size != proto.size:
                raise RefitError(f"{self.name} weight {name}: {a.size} values (shape {a.shape}) given, "
                                 f"the engine's has {proto.size}")
            if a.dtype != want and not (a.dtype.kind == "f" and want.kind == "f"):
                raise RefitError(f"{self.name} weight {name}: {a.dtype} given, the engine's is {want}")
            held.append((name, np.ascontiguousarray(a, dtype=want)))
        for name, a in held:
            if not refitter.set_named_weights(name, trt.Weights(a)):
                raise RefitError(f"TensorRT refused {self.name} weight {name} ({a.dtype}, {a.size} values)")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise RefitError(f"the {self.name} engine needs weight(s) {_first(missing)} together with the given "
                             "ones (fused in the engine): pass their values too", missing)
        self._session.synchronize()  # no enqueued work may use the engine while it is refitted
        ok = refitter.refit_cuda_engine()
        del held
        self._drop_graph()  # a captured CUDA graph is recaptured on the next call
        if not ok:
            missing = list(refitter.get_missing_weights())
            why = f"it needs weight(s) {_first(missing)} too" if missing else "see TensorRT's log above"
            raise RefitError(f"TensorRT could not refit the {self.name} engine ({why}); some weights may have been "
                             "replaced: set them again or reload the pipeline", missing)

    def _exported(self, initializer: str) -> np.ndarray:
        from ..lora import WeightMap

        if self._weight_map is None:
            self._weight_map = WeightMap(self.model_dir, self.name, self._component_record)
        return self._weight_map.exported(initializer)

    def close(self) -> None:
        if self.context is None:
            return
        s = self._session
        try:
            s.synchronize()
        except RuntimeError:
            pass
        self._drop_graph()
        for ptr, _ in self._buffers.values():
            s.free(ptr)
        self._buffers.clear()
        self._held.clear()
        ctx, self.context = self.context, None
        s.detach(ctx)
        del ctx
        self.engine = None


def open_engines(model_dir: Path, manifest: dict, records: dict[str, dict], *, cuda_graph: bool = False,
                 low_memory: bool = False, fallback=None) -> dict:
    """{component: engine} for every component of the manifest, from the checked ``records`` (see
    tensorrt_records). The VAE encoder (and, with ``low_memory``, every engine) opens on first use.
    A component without a usable engine opens ``fallback(name)`` (auto: ONNX Runtime) or, with no
    fallback, fails on first use with the ``sdrt build`` command that makes it."""
    from . import LazyEngine

    session = _Session()
    vsf = int(manifest.get("vae_scale_factor", 8))
    engines = {}
    for name in manifest["components"]:
        rec = records.get(name)
        if rec is not None:
            def open_engine(weights=None, name=name, rec=rec):
                engine = TrtEngine(name, model_dir, rec, manifest["components"][name], session, vae_scale_factor=vsf,
                                   cuda_graph=cuda_graph and name == "unet")
                engine.set_weights(weights or {})  # LoRA under low_memory: each opening is refitted
                return engine
        elif fallback is not None:
            def open_engine(weights=None, name=name):
                return fallback(name, weights)
        else:
            def open_engine(weights=None, name=name):
                raise BackendUnavailable(
                    f"{model_dir} has no usable TensorRT engine for {name} on this GPU; build it with "
                    f"`sdrt build {model_dir} --components {name}`"
                )
        engines[name] = LazyEngine(name, open_engine) if opens_lazily(name, low_memory) else open_engine()
    return engines
