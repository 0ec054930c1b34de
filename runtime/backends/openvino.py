"""OpenVINO engines (CPU), behind the Engine interface: the model directory's own ONNX graphs, read by
OpenVINO's ONNX frontend (external data beside them), compiled for the CPU plugin.

- Precision is explicit: the CPU plugin runs float ops in bf16 by default on CPUs with AVX-512 BF16 or
  AMX, so fp32 (the parity path) sets ``INFERENCE_PRECISION_HINT`` to f32; ``precision="bf16"`` sets bf16
  (where the CPU has it: precision.check says so in one line elsewhere). An int8 graph (``sdrt quantize``:
  QDQ) becomes OpenVINO's FakeQuantize and runs int8 kernels; its float ops stay f32.
- Threads: ``INFERENCE_NUM_THREADS`` = physical cores, ``PERFORMANCE_HINT`` LATENCY (one stream).
- Shapes: the graphs have dynamic batch / height / width. Compiled for the shape of each call (the graph
  reshaped to it), they run 25-30% faster than compiled dynamic (the small sd1 test UNet, 2 cores); one
  compiled shape is held per component at a time. Each shape compiled is cached on disk under the same cache
  root as ONNX Runtime's optimized graphs (keyed by the graph's sha256, OpenVINO's version and the
  precision): weightless (``CACHE_MODE`` OPTIMIZE_SIZE, a few MB), imported afterwards with its weights read
  from the graph's own weights file (``WEIGHTS_PATH``), in less time than a compile (``OvEngine._compile``).
- Memory: while a graph compiles or imports, the pages of its weights file mapped into the process are
  dropped as the plugin goes (``_DroppedPages``): it keeps the graph's Constants alive beside its own
  repacked copies, so otherwise each weight would be resident twice (sd1-full's fp32 UNet: peak 6.8 -> 3.5 GB).
- bf16 reads its weights in bf16: on first use the graph is saved once as an OpenVINO IR whose float weights
  are bf16 Constants (each rounded to nearest even from the exported fp32, as the plugin itself would round
  them) behind decompression Converts (``_bf16_weights_ir``), in the compile cache's folder. Compiling it reads
  half the bytes (sd1-full's UNet: 1.7 instead of 3.4 GB); and OpenVINO runs the matrix products whose weights
  it decompresses with f32 activations, which halves bf16's error against fp32 (the default model's UNet: rms
  0.011 -> 0.006) and costs 6% of a UNet step (sd1-full, 256x256: 941 -> 1003 ms). The denoisers only (UNet,
  ControlNets).
- The first call's wait: each component remembers the shape it last compiled (``shape.json`` in its cache
  folder), and an engine made afterwards imports that shape's cached model in a thread of its own
  (``_Prefetch``) while the pipeline goes on (the other engines opening, the text encoder running); the first
  call at that shape takes it, another shape drops it and compiles its own. sd1-full's fp32 UNet import
  (5-11 s on 2 cores) then overlaps the text encoder's and the VAE decoder's instead of following them.
- ``set_weights`` (LoRA): the graph is read again and the named initializers (OpenVINO Constants keep
  their ONNX names) are replaced before compiling; every other weight takes its exported value.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..files import release_memory
from .base import BackendUnavailable, cache_entry
from .onnxruntime import _writable_cache_root, physical_cores

# sdrt's precision names -> OpenVINO's inference precision hint. int8 is the fastest mode: its float ops (the
# quantized UNet's unquantized ones, the VAE) in bf16 where the CPU runs bf16 natively, as OpenVINO's own
# default does with optimum-intel's hybrid-quantized models (measured on sd1-full: VAE decode 3.2 -> 1.6 s at
# 256x256)
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# Components that stay f32 in every precision: a text encoder runs once per prompt (80 ms of an 11 s sd1-full
# image in f32), and its conditioning steers every step: in bf16 it cost the default model 1 to 3 points of
# colour accuracy at guidance 7.5 (seeds 0 and 2), the VAE's bf16 none.
FP32_ALWAYS = ("text_encoder", "text_encoder_2")


def _hint(precision: str, component: str | None = None) -> str:
    if component in FP32_ALWAYS:
        return "f32"
    if precision == "int8":
        from ..precision import isa

        return "bf16" if isa()["bf16"] else "f32"
    return _HINTS[precision]


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'sdrt[openvino]'") from e
    return ov


def _detail(e: Exception) -> str:
    """The informative lines of an OpenVINO exception (its first lines name C++ source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '", "Loading input model"))]
    return (" ".join(useful or lines) or type(e).__name__)[:300]


class _DroppedPages:
    """While OpenVINO compiles (or imports) a graph, the pages of its weights file(s) mapped into this process
    are dropped from it every ``period`` seconds, and once more at the end; ``dropped``: the bytes of mapping
    released by that last pass.

    The CPU plugin reads each weight from the mapped file while it repacks it into its own memory, and keeps
    the graph's Constants alive beside the repacked copies: left alone, every page it read stays resident, so a
    compile peaks at twice the weights (sd1-full's fp32 UNet: 6.8 GB; 3.5 GB with this, and no slower: pages
    read again fault back in from the page cache, and the plugin reads each weight about once).
    ``madvise(MADV_DONTNEED)`` on a read-only file mapping only unmaps pages: nothing is lost. Only read-only
    mappings of exactly these files are touched, never anonymous memory (whose pages the call would zero).
    Linux only; elsewhere nothing."""

    def __init__(self, files, period: float = 0.2):
        self.files = {str(Path(f).resolve()) for f in files if f}  # may be written while it runs
        self.period, self.dropped = period, 0
        self._stop = self._thread = None

    def _drop(self) -> int:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        dropped = 0
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "w" not in parts[1] and parts[5] in self.files:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(lo, hi - lo, 4) == 0:  # MADV_DONTNEED
                    dropped += hi - lo
        return dropped

    def __enter__(self):
        if self.files and Path("/proc/self/maps").is_file():
            import threading

            self._stop = threading.Event()

            def run():
                while not self._stop.wait(self.period):
                    self._drop()

            self._thread = threading.Thread(target=run, name="sdrt-drop-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.dropped = self._drop()
        return False


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; finite values past bfloat16's range
    become its largest finite value (not infinity), NaN stays NaN."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    over = ((bits & 0x7F80) == 0x7F80) & np.isfinite(a)
    bits[over] = (bits[over] & 0x8000) | 0x7F7F
    bits[np.isnan(a)] = 0x7FC0
    return bits


def _bf16_weights_ir(core, model, xml: Path, weights_file: Path | None = None) -> None:
    """Save ``model`` (read from the exported graph) as an IR at ``xml`` whose float weights are bf16 Constants
    behind decompression Converts. OpenVINO's documented writer marks the Converts only for f16
    (``save_model(compress_to_fp16=True)``), so the model is saved that way first, and each f16 Constant is
    then replaced by the bf16 rounding of its exported fp32 value (the f16 one is never used); the writes are
    renamed into place, .bin before .xml, so a reader that finds the .xml finds both. The pages of the exported
    weights (``weights_file``) and of the f16 IR's read while it works are dropped as it goes (_DroppedPages):
    the first bf16 load of sd1-full's UNet peaks at 3.5 GB instead of 5.1 GB while it makes the IR."""
    import openvino as ov

    exported = {op.get_friendly_name(): op for op in model.get_ops()
                if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f32}
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}")
    half, out = tmp.with_suffix(".f16.xml"), tmp.with_suffix(".xml")
    with _DroppedPages([weights_file, half.with_suffix(".bin")]):
        try:
            ov.save_model(model, str(half), compress_to_fp16=True)
            compressed = core.read_model(str(half))
            alive = []  # the bf16 arrays the new Constants share: alive until the model is written
            for op in compressed.get_ops():
                if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f16:
                    continue
                name = op.get_friendly_name()
                source = exported.get(name[: -len("_compressed")] if name.endswith("_compressed") else name)
                if source is None:
                    continue
                shape = list(op.get_shape())
                bits = _bf16_bits(source.get_data()).reshape(shape)
                alive.append(bits)
                new = ov.op.Constant(ov.Tensor(bits, ov.Shape(shape), ov.Type.bf16))
                new.set_friendly_name(name)
                op.output(0).replace(new.output(0))
            compressed.validate_nodes_and_infer_types()
            ov.save_model(compressed, str(out), compress_to_fp16=False)
            del compressed, alive
            os.replace(out.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(out, xml)
        finally:
            for f in (half, half.with_suffix(".bin"), out, out.with_suffix(".bin")):
                f.unlink(missing_ok=True)


class _Prefetch:
    """A compiled model imported from the cache in a thread of its own: ``take(signature)`` waits for it and
    returns (signature, compiled, request) where it is for ``signature``, else None (it is dropped: one
    compiled shape at a time). Any failure leaves None: the call compiles as if nothing was prefetched."""

    def __init__(self, signature: tuple, load):
        import threading

        self._result = None

        def run():
            try:
                compiled = load()
                if compiled is not None:
                    self._result = (signature, compiled, compiled.create_infer_request())
            except Exception:  # noqa: BLE001 - the call compiles instead, and reports any real error itself
                self._result = None

        # not a daemon: a process that exits mid-import waits for it rather than tearing OpenVINO down under it
        self._thread = threading.Thread(target=run, name="sdrt-ov-prefetch")
        self._thread.start()

    def take(self, signature: tuple | None = None):
        self._thread.join()
        result, self._result = self._result, None
        return result if result is not None and result[0] == signature else None


def _signature_json(signature: tuple) -> list:
    return [[name, list(shape)] for name, shape in signature]


class OvEngine:
    """One ONNX graph compiled by OpenVINO for the CPU."""

    def __init__(self, name: str, model_dir: Path, record: dict, threads: int | None = None, precision: str = "fp32",
                 cache: bool = True, weights: dict | None = None, static_shapes: bool = True, prefetch: bool = True):
        ov = _import_openvino()
        self.name, self.model_dir, self.record = name, Path(model_dir), record
        self.path = self.model_dir / record["file"]
        for path in (self.path, record.get("external_data") and self.model_dir / record["external_data"]):
            if path and not path.is_file():
                from ..manifest import ModelDirError

                raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
        self.precision, self.static_shapes = precision, static_shapes
        self.threads = threads or physical_cores()
        self.config = {"INFERENCE_PRECISION_HINT": _hint(precision, name), "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": self.threads}
        self.core = ov.Core()
        self.weights: dict = dict(weights or {})
        self.cache_dir = self._cache_dir(ov) if cache else None
        self._compiled = None  # (shape signature, compiled model, infer request)
        self.cache_state = ""  # what the compiled model in use came from: "hit" (the cache), "filled" (compiled and
        # cached), "none" (compiled, not cacheable); "" before the first call
        self.model = self._read()
        self.input_names = [self._port_name(p, record["inputs"]) for p in self.model.inputs]
        self.output_names = [self._port_name(p, record["outputs"]) for p in self.model.outputs]
        self._prefetch = self._start_prefetch() if prefetch else None

    @property
    def from_cache(self) -> bool | None:
        """Whether the compiled model in use was imported from the cache; None before the first call."""
        return self.cache_state == "hit" if self.cache_state else None

    @staticmethod
    def _port_name(port, specs: list) -> str:
        """The manifest's name for an OpenVINO port (a tensor may carry several names)."""
        names = port.get_names()
        for spec in specs:
            if spec["name"] in names:
                return spec["name"]
        return port.get_any_name()

    def _cache_dir(self, ov) -> Path | None:
        root = _writable_cache_root(self.model_dir)
        if root is None:
            return None
        rec = self.record
        stats = [((self.model_dir / f).stat().st_size, (self.model_dir / f).stat().st_mtime_ns)
                 for f in (rec["file"], rec.get("external_data")) if f]
        # keyed by what is compiled (the graph, the IR made from it, the hint), not by the precision asked for: int8's
        # text encoder is fp32's compile, its VAE decoder bf16's
        source = "bf16-ir" if self._reads_bf16_ir() else "graph"
        key = hashlib.sha256(f"{rec.get('sha256')}|{rec.get('external_data_sha256')}|{stats}|{ov.__version__}|"
                             f"{source}|{self.config['INFERENCE_PRECISION_HINT']}|{self.threads}".encode()).hexdigest()[:16]
        return cache_entry(root, self.name, "openvino", key)

    def _reads_bf16_ir(self) -> bool:
        """Whether this engine compiles a bf16-weights IR: in bf16, with the exported weights, for a denoiser (the
        UNet, a ControlNet: their weights are the bulk of a model; not a VAE, whose decoder decodes 14% slower
        from it)."""
        from ..controlnet import is_controlnet

        return (self.config["INFERENCE_PRECISION_HINT"] == "bf16" and self.precision == "bf16" and not self.weights
                and (self.name == "unet" or is_controlnet(self.name)))

    def _bf16_ir(self) -> Path | None:
        """Where this engine's bf16-weights IR is cached (``_reads_bf16_ir``, in a writable cache), else None."""
        return self.cache_dir / "model.bf16.xml" if self.cache_dir is not None and self._reads_bf16_ir() else None

    def _read(self):
        """The graph as exported (external data read by OpenVINO itself), its named initializers replaced by
        set_weights' arrays; in bf16, the IR with its weights in bf16 (made from it on first use)."""
        ir = self._bf16_ir()
        model = None if ir is None else self._read_ir(ir)
        if model is not None:
            return model
        try:
            model = self.core.read_model(str(self.path))
        except RuntimeError as e:
            from ..manifest import ModelDirError

            raise ModelDirError(f"OpenVINO cannot read {self.path} ({_detail(e)}); if the file is damaged, "
                                "re-export the model with `sdrt export --overwrite`") from e
        data = self.record.get("external_data")
        self._weights_file = self.model_dir / data if data else None
        if ir is not None:
            try:
                ir.parent.mkdir(parents=True, exist_ok=True)
                for stale in ir.parent.glob("*.sdrt.blob"):  # compiled from an earlier IR: its offsets
                    stale.unlink(missing_ok=True)
                _bf16_weights_ir(self.core, model, ir, self._weights_file)
                built = self._read_ir(ir)
            except (OSError, RuntimeError):
                built = None  # a cache that cannot take it: the exported graph, its weights rounded when compiled
            if built is not None:
                return built
        self._restore_inputs(model)
        if self.weights:
            self._replace_constants(model)
        return model

    def _read_ir(self, ir: Path):
        """The bf16-weights IR, or None where it is missing or damaged (then removed, to be made again)."""
        if not (ir.is_file() and ir.with_suffix(".bin").is_file()):
            return None
        try:
            model = self.core.read_model(str(ir))
        except RuntimeError:
            ir.unlink(missing_ok=True)
            return None
        self._restore_inputs(model)
        self._weights_file = ir.with_suffix(".bin")
        return model

    def _restore_inputs(self, model) -> None:
        """An ONNX graph input that is also an initializer (a default value: sdrt's text encoders' attention
        mask, all ones) is an input for ONNX Runtime but a Constant for OpenVINO's frontend: made a Parameter
        again, so the mask the runtime feeds is the one used."""
        import openvino as ov

        have = set().union(*(p.get_names() for p in model.inputs))
        missing = {t["name"]: t for t in self.record["inputs"] if t["name"] not in have}
        if not missing:
            return
        for op in model.get_ops():
            if op.get_type_name() != "Constant":
                continue
            hit = missing.keys() & (op.output(0).get_names() | {op.get_friendly_name()})
            if not hit:
                continue
            spec = missing.pop(hit.pop())
            shape = ov.PartialShape([d if isinstance(d, int) else -1 for d in spec["shape"]])
            param = ov.op.Parameter(op.get_output_element_type(0), shape)
            param.set_friendly_name(spec["name"])
            param.output(0).set_names({spec["name"]})
            op.output(0).replace(param.output(0))
            model.add_parameters([param])
        model.validate_nodes_and_infer_types()

    def _replace_constants(self, model) -> None:
        import openvino as ov

        consts = {}
        for op in model.get_ops():
            if op.get_type_name() == "Constant":
                for n in op.output(0).get_names() | {op.get_friendly_name()}:
                    consts.setdefault(n, op)
        missing = [n for n in self.weights if n not in consts]
        if missing:
            from ..errors import ConfigError

            raise ConfigError(f"{self.name}: OpenVINO's graph has no weight named {missing[0]!r} "
                              f"({len(missing)} missing); apply this LoRA with --backend ort-cpu")
        for name, value in self.weights.items():
            old = consts[name]
            array = np.ascontiguousarray(value() if callable(value) else value)
            if tuple(array.shape) != tuple(old.get_output_shape(0)):
                raise ValueError(f"{self.name}: weight {name} has shape {array.shape}, the graph's is "
                                 f"{tuple(old.get_output_shape(0))}")
            new = ov.op.Constant(array.astype(old.get_element_type().to_dtype(), copy=False))
            new.set_friendly_name(old.get_friendly_name())
            new.output(0).set_names(old.output(0).get_names())
            old.output(0).replace(new.output(0))

    def set_weights(self, weights: dict) -> None:
        """Run with these initializers (the graph's own names -> arrays of its shape and dtype, or functions
        making them) instead of the exported ones; every other weight takes its exported value. The graph is
        read again with them and compiled on the next call (without the disk cache: it is keyed by the
        exported weights)."""
        self._take_prefetched()  # compiled from the exported weights: not these
        self.weights = dict(weights)
        self._compiled = None
        self.model = None
        release_memory()
        self.model = self._read()

    def _shape_memo(self) -> Path | None:
        return None if self.cache_dir is None or self.weights or not self.static_shapes else self.cache_dir / "shape.json"

    def _start_prefetch(self) -> _Prefetch | None:
        """Import the shape this component last compiled, in a thread, where its cached model is there."""
        import json

        memo = self._shape_memo()
        try:
            signature = tuple((n, tuple(int(d) for d in shape)) for n, shape in json.loads(memo.read_text()))
        except (AttributeError, OSError, ValueError, TypeError):
            return None  # no memo (none written yet, no cache, set_weights' weights) or a damaged one
        blob = self._blob(signature)
        if blob is None or not blob.is_file():
            return None
        return _Prefetch(signature, lambda: self._import(blob))

    def _take_prefetched(self, signature: tuple | None = None):
        prefetch, self._prefetch = self._prefetch, None
        return prefetch.take(signature) if prefetch is not None else None

    def _remember(self, signature: tuple) -> None:
        """Write the shape just compiled as the one to prefetch next time (where it is not already)."""
        import json

        from ..files import write_json_atomic

        memo = self._shape_memo()
        if memo is None:
            return
        try:
            if memo.is_file() and json.loads(memo.read_text()) == _signature_json(signature):
                return
            write_json_atomic(memo, _signature_json(signature))
        except (OSError, ValueError):
            pass  # a cache that cannot take it: nothing prefetched next time

    def _blob(self, signature: tuple) -> Path | None:
        """Where the compiled model for ``signature`` is cached, or None: no writable cache, or set_weights'
        weights (the cache is keyed by the exported ones)."""
        if self.cache_dir is None or self.weights:
            return None
        source = self._weights_file.name if self._weights_file else self.path.name
        shapes = signature if self.static_shapes else "dynamic"
        return self.cache_dir / f"{hashlib.sha256(f'{shapes}|{source}'.encode()).hexdigest()[:16]}.sdrt.blob"

    def _compile(self, signature: tuple):
        """The compiled model for ``signature`` and an infer request: imported from the cache where this shape
        was compiled before, else compiled from the graph (and then cached).

        The cache is sdrt's own rather than OpenVINO's CACHE_DIR, which never hits a weightless entry of a
        graph read from ONNX (OpenVINO 2026.4: the entry is written and rewritten, every load compiles anew),
        and on a hit would hash the whole graph first, reading every weight. An import reads only the blob and
        the weights it repacks (sd1-full's fp32 UNet: 4.5 s, against 7-13 s to compile)."""
        blob = self._blob(signature)
        compiled = self._import(blob) if blob is not None and blob.is_file() else None
        self.cache_state = "hit"
        if compiled is None:
            if self.model is None:
                self.model = self._read()
            compiled, cacheable = self._compile_graph(signature, cache=blob is not None)
            self.cache_state = "filled" if cacheable and self._save(compiled, blob) else "none"
        return compiled, compiled.create_infer_request()

    def _compile_graph(self, signature: tuple, cache: bool):
        """(compiled model, whether to cache its export) for ``signature``, from the graph. With its weights in a
        file of their own, the export is weightless: the blob holds the compiled graph, not the weights (3.3 MB,
        not 3.4 GB); a graph with its weights inside (a VAE: OpenVINO cannot find them there again) exports
        them too."""
        config = dict(self.config)
        if cache and self._weights_file is not None:
            config["CACHE_MODE"] = "OPTIMIZE_SIZE"
        model = self.model
        if self.static_shapes:
            model = model.clone()
            model.reshape({name: list(shape) for name, shape in signature})
        try:
            with _DroppedPages([self._weights_file]):
                try:
                    return self.core.compile_model(model, "CPU", config), cache
                except RuntimeError as e:
                    if "CACHE_MODE" not in config or "CACHE_MODE" not in str(e):
                        raise
                    del config["CACHE_MODE"]  # an OpenVINO without weightless caching: compiled, not cached
                    return self.core.compile_model(model, "CPU", config), False
        except RuntimeError as e:
            raise BackendUnavailable(f"OpenVINO cannot compile {self.name} for the shapes {dict(signature)}: "
                                     f"{_detail(e)}") from e

    def _import(self, blob: Path):
        """The compiled model in ``blob``, its weights read from the graph's weights file (from the blob, for a
        graph with its weights inside); None where the blob cannot be imported (then removed, to be compiled
        and written again)."""
        config = dict(self.config)
        if self._weights_file is not None:
            config.update({"CACHE_MODE": "OPTIMIZE_SIZE", "WEIGHTS_PATH": str(self._weights_file)})
        try:
            data = blob.read_bytes()
            with _DroppedPages([self._weights_file]):
                return self.core.import_model(data, "CPU", config)
        except (OSError, RuntimeError):
            blob.unlink(missing_ok=True)
            return None

    @staticmethod
    def _save(compiled, blob: Path) -> bool:
        from ..files import write_atomic

        try:
            blob.parent.mkdir(parents=True, exist_ok=True)
            data = compiled.export_model()
            write_atomic(blob, lambda f: f.write(data.getvalue() if hasattr(data, "getvalue") else data))
            return True
        except (OSError, RuntimeError):
            return False  # a cache that cannot take it: compiled again next time

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        # only what the graph takes (OpenVINO drops an input no output depends on; ONNX Runtime ignores it)
        inputs = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names if n in inputs}
        signature = tuple((n, x.shape) for n, x in inputs.items())
        if self._prefetch is not None:
            self._compiled = self._take_prefetched(signature)  # a shape memo is kept for static shapes only
            if self._compiled is not None:
                self.cache_state = "hit"
        if self._compiled is None or (self.static_shapes and self._compiled[0] != signature):
            self._compiled = None  # one compiled shape at a time: each holds its own copy of the weights
            release_memory()
            self._compiled = (signature, *self._compile(signature))
            self._remember(signature)
        if self.model is not None:
            # the compiled model holds its own (repacked) weights: the graph read from disk is dropped (read
            # again, 0.4 s for SD 1.5's UNet, when another shape comes), so its pages leave this process's RSS
            self.model = None
            release_memory()
        _, compiled, request = self._compiled
        result = request.infer(inputs)
        return {name: np.array(result[port]) for name, port in zip(self.output_names, compiled.outputs)}

    def profiling_info(self) -> list[dict]:
        """Per-node timings of the last call (node, OpenVINO node type, kernel, seconds) where the engine was
        compiled with ``PERF_COUNT`` (``engine.config["PERF_COUNT"] = True`` before its first call); else []."""
        if self._compiled is None:
            return []
        return [{"node": p.node_name, "type": p.node_type, "kernel": p.exec_type,
                 "seconds": p.real_time.total_seconds()} for p in self._compiled[2].profiling_info]

    def close(self) -> None:
        self._take_prefetched()
        self._compiled = None
        self.model = None
        release_memory()
