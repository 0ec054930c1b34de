"""ONNX Runtime engines: CPU (default) and CUDA (onnxruntime-gpu), behind the Engine interface."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..files import release_memory
from .base import BackendUnavailable, cache_entry


def physical_cores() -> int:
    """Physical cores this process may use: intra-op threads beyond them only contend (hyper-threads
    share the FMA units that convolutions and matmuls saturate)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys, core = set(), None, None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                core = val.strip()
            elif not line.strip() and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
        n = len(cores) or allowed
    except OSError:
        n = allowed
    return max(1, min(n, allowed))


def cuda_available() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _writable_cache_root(model_dir: Path) -> Path | None:
    """Optimized graphs are cached beside the model; a model installed as package data (the default
    model included), or in a read-only directory, caches under the user's cache folder instead."""
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"
    from ..default_model import DEFAULT_MODEL_DIR

    resolved = model_dir.resolve()
    installed = any(part in ("site-packages", "dist-packages") for part in resolved.parts)
    installed = installed or resolved == DEFAULT_MODEL_DIR.resolve()  # package data, even in a source checkout
    for root in ((user,) if installed else (model_dir / "cache", user)):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    return None


def _made(values: dict, threads: int, make) -> dict[str, np.ndarray]:
    """name -> ``make(name, value)`` for each of ``values`` (LoRA merges: a read, a rank-r product and an add
    each, which release the GIL) on ``threads`` threads."""
    if threads < 2 or len(values) < 2:
        return {n: make(n, v) for n, v in values.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(values, pool.map(make, values, values.values())))


def _array(name: str, value) -> np.ndarray:
    return np.ascontiguousarray(value() if callable(value) else value)


_ARENA_LOCK = threading.Lock()


def _shared_cpu_arena(ort) -> bool:
    """One CPU memory arena for every sdrt session in the process (registered once with ONNX Runtime's
    environment), growing by what is asked (kSameAsRequested). Locked: engines open on several threads."""
    with _ARENA_LOCK:
        return _register_arena(ort)


@functools.lru_cache(maxsize=None)
def _register_arena(ort) -> bool:
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        return True
    except Exception:  # an ONNX Runtime without environment allocators: each session its own arena
        return False


def _writes_into(value) -> bool:
    """A function making a weight into a buffer it is given (``value(out=buffer)``), its shape and dtype told."""
    return callable(value) and hasattr(value, "shape") and hasattr(value, "dtype")


class _Shared:
    """set_weights' weights handed to a session by address (``SessionOptions.add_initializer``: ONNX Runtime
    reads them where they lie, no copy), so they live as long as the session.

    Those the CPU provider prepacks (``prepacked``: MatMul/Gemm B inputs, copied into a packed layout while the
    session is made and never read again) are made each in an anonymous memory map whose pages are handed
    back once the session stands (MADV_DONTNEED: the address stays valid, and would read as zeros), so the
    process holds each weight once, as without LoRA; the others (re-laid-out convolution weights) are read in
    place by the session, instead of a copy of them."""

    def __init__(self, values: dict, prepacked, threads: int):
        self.maps: list[mmap.mmap] = []

        def make(name, value):
            if name not in prepacked or not _writes_into(value) or not hasattr(mmap, "MADV_DONTNEED"):
                return _array(name, value)  # kept (without madvise, as on Windows: beside the packed copy)
            mapped = _populated(np.dtype(value.dtype).itemsize * math.prod(value.shape))
            self.maps.append(mapped)  # list.append is atomic: the pool's threads share the list
            out = np.frombuffer(mapped, value.dtype, math.prod(value.shape)).reshape(value.shape)
            value(out=out)
            return out

        self.arrays = _made(values, threads, make)
        self.values: dict = {}

    def bind(self, ort, opts) -> None:
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items()}
        for name, value in self.values.items():
            opts.add_initializer(name, value)

    def release_prepacked(self) -> None:
        for mapped in self.maps:
            mapped.madvise(mmap.MADV_DONTNEED)


def _populated(size: int) -> mmap.mmap:
    """An anonymous memory map of ``size`` bytes, its pages faulted in when it is made (MAP_POPULATE): one call
    instead of a fault per page as each is first written, 7x faster on a virtual machine, where every page
    fault traps to the hypervisor (1 GiB: 0.33 s against 2.4 s)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


def _relaid_value(value, layout: str, block: int) -> np.ndarray:
    from .nchwc import reorder

    return reorder(np.asarray(value() if callable(value) else value), layout, block)


class OrtEngine:
    """One ONNX graph in an InferenceSession.

    CPU: intra-op threads = physical cores, thread spinning off (spinning workers steal the core
    the numpy scheduler runs on between calls: onnxruntime issue 13808), all graph optimizations,
    and the optimized graph cached (keyed by the graph's sha256, ONNX Runtime version and provider)
    so later loads skip the optimization passes.
    CUDA: IO binding; an input passed as the same array object as in the previous call (the text
    embeddings, every step) is not copied to the device again.
    """

    def __init__(self, name: str, model_dir: Path, record: dict, provider: str = "cpu", threads: int | None = None,
                 cache: bool = True, weights: dict | None = None):
        self.name = name
        self.provider = provider
        self.model_dir, self.record = Path(model_dir), record
        self.path = self.model_dir / record["file"]
        for path in (self.path, record.get("external_data") and self.model_dir / record["external_data"]):
            if path and not path.is_file():
                from ..manifest import ModelDirError

                raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
        if provider == "cuda" and not cuda_available():
            raise BackendUnavailable(
                "ONNX Runtime's CUDA provider is not available here: install onnxruntime-gpu (pip install 'sdrt[gpu]') on a machine with an NVIDIA GPU"
            )
        self.threads, self.cache = threads or physical_cores(), cache
        self.providers = (
            [("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
            if provider == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.weights: dict = dict(weights or {})  # what set_weights was given (arrays or makers of them)
        self._shared: _Shared | None = None  # the set_weights arrays a cached-graph session reads by address
        self.cache_state = ""  # "hit" (made from the cache), "filled" (optimized and cached now), "none" (no cache used)
        self.session = self._load()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._on_device: dict[str, tuple[np.ndarray, object]] = {}

    @property
    def source(self) -> str:
        """What the session was made from: "cache" (the optimized graph) or "graph" (the export's)."""
        return "cache" if self.cache_state == "hit" else "graph" if self.cache_state else ""

    def set_weights(self, weights: dict) -> None:
        """Run with these initializers (the graph's own names -> arrays of its shape and dtype, or functions
        making them) instead of the exported ones; every other weight, those set before included, takes its
        exported value. The session is reopened, so the old session's weights are freed before the new ones
        are made: the process holds one set of weights, as without LoRA.

        On the optimized-graph cache (CPU) the weights are handed over by address (``_Shared``): no copy,
        and the prepacked ones handed back once packed; arrays given as such are read where they lie, so they
        are not to be changed afterwards. Otherwise (the exported graph, CUDA) they go through
        ONNX Runtime's external-initializer override, applied before its graph optimizations so that fused
        and re-laid-out weights follow; ONNX Runtime copies them into its graph, and they are dropped once
        the session stands."""
        self.weights = dict(weights)
        self.session = None
        self._shared = None
        self._on_device.clear()
        self.session = self._load()

    def _session(self, ort, path: Path, level, overrides: dict, save_to: Path | None = None, config: dict | None = None,
                 prepacked=None):
        """An InferenceSession of ``path`` at optimization ``level``, its initializers overridden by ``overrides``
        (name -> array or function making it, made here): by address when ``prepacked`` (the names the session
        packs) is given, else copied in by ONNX Runtime; the optimized graph saved to ``save_to``; ``config``:
        more session config entries."""
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # One memory arena for all of sdrt's CPU sessions (_shared_cpu_arena): without an arena every buffer
        # goes back to the OS after each call, and the next call faults its pages in again (sd1-full at
        # 256x256: 70k faults a UNet step, 7% of its time; 250k in the VAE decode). Shared, the process holds
        # the largest footprint of any one call (the VAE decode's), not every session's own: peak RSS +3%.
        opts.enable_cpu_mem_arena = True
        if self.provider == "cpu" and _shared_cpu_arena(ort):
            opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.graph_optimization_level = level
        shared = held = None
        if overrides and prepacked is not None:
            shared = _Shared(overrides, prepacked, self.threads)
            shared.bind(ort, opts)
        elif overrides:
            held = _made(overrides, self.threads, _array)
            names = list(held)
            opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(held[n]) for n in names])
        if save_to is not None:
            opts.optimized_model_filepath = str(save_to)
        session = ort.InferenceSession(str(path), opts, providers=self.providers)
        del held  # copied into the session's graph; made again if a later session needs them
        if shared is not None:
            shared.release_prepacked()
            self._shared = shared
        return session

    def _load(self):
        import onnxruntime as ort

        from onnxruntime.capi import onnxruntime_pybind11_state as state

        try:
            session = self._open_cached(ort) if self.cache else None
            if session is None:
                session = self._session(ort, self.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, self.weights)
                self.cache_state = "none"
        except (state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.Fail) as e:
            if self.weights:
                raise  # weights given by set_weights that the graph refuses: not the file's fault
            from ..manifest import ModelDirError

            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelDirError(f"{self.path} is damaged: ONNX Runtime cannot load it ({first}); "
                                "re-export the model with `sdrt export --overwrite`") from e
        if self.weights and self._shared is None:
            release_memory()  # ONNX Runtime's copies of them, freed into the heap
        return session

    def _open_cached(self, ort):
        """Open from the optimized-graph cache, filling it first if needed; None if no cache can be used.

        The cache holds the graph after all of ONNX Runtime's optimizations (the NCHWc layout included:
        23% faster SD 1.5 UNet steps on AVX2), loaded with none, so a load skips them (1.1 s against 9 s for
        an SD 1.5 UNet). Overridden weights (set_weights) apply to the cached graph: MatMul and Gemm weights
        keep their names there (they are packed when the session is made, not in the graph); convolution
        weights that the layout pass re-laid out under new names are found by value when the cache is
        filled (nchwc.py, relaid.json) and handed over in that layout. A weight found in neither form opens
        the exported graph with every pass instead."""
        root = _writable_cache_root(self.model_dir)
        if root is None:
            return None
        record = self.record
        # the files' size and mtime too: a graph damaged after its cache entry was made is not hidden by it
        stats = [((self.model_dir / f).stat().st_size, (self.model_dir / f).stat().st_mtime_ns)
                 for f in (record["file"], record.get("external_data")) if f]
        key = hashlib.sha256(
            f"{record.get('sha256')}|{record.get('external_data_sha256')}|{stats}|{ort.__version__}|{self.provider}".encode()
        ).hexdigest()[:16]
        entry = cache_entry(root, self.name, f"ort-{self.provider}", key)
        cached = entry / "model.onnx"
        if cached.is_file():
            relaid = self._relaid(entry) if self.weights else {}
            overrides = self._cache_overrides(relaid) if self.weights else {}
            if overrides is None:
                return None  # a weight the cached graph holds in no form sdrt knows: the exported graph
            # by address on the CPU; a device provider copies the weights over, so ONNX Runtime's own copy is kept
            prepacked = set(relaid.get("prepacked", ())) if overrides and self.provider == "cpu" else None
            try:
                session = self._session(ort, cached, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, overrides,
                                        prepacked=prepacked)
                self.cache_state = "hit"
                return session
            except Exception:
                if self.weights:
                    return None
                shutil.rmtree(entry, ignore_errors=True)  # stale or damaged: rebuild below
        if self.weights:
            return None  # the cache is filled from the exported weights only
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        config = {}
        if record.get("external_data"):
            config["session.optimized_model_external_initializers_file_name"] = "model.onnx_data"
            config["session.optimized_model_external_initializers_min_size_in_bytes"] = "1024"
        try:
            session = self._session(ort, self.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, {}, tmp / "model.onnx", config)
            self._relaid(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process filled the cache first
        self.cache_state = "filled"
        return session

    def _relaid(self, entry: Path) -> dict:
        """The cache entry's map (nchwc.py): its re-laid-out convolution weights and the weights ONNX Runtime
        prepacks; made and kept beside it the first time it is needed (entries made by an older sdrt included)."""
        from .nchwc import RELAID_FILE, RELAID_VERSION, map_relaid

        path = entry / RELAID_FILE
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if found.get("version") == RELAID_VERSION:
                return found
        except (OSError, ValueError):
            pass
        found = {"relaid": {}, "absent": [], "prepacked": []}
        if self.record.get("weights") and (entry / "model.onnx").is_file():
            weights = self.model_dir / self.record["weights"]
            try:
                found = map_relaid(entry / "model.onnx", weights.parent, weights)
            except (OSError, ValueError, KeyError):
                return found  # unreadable: each weight is looked up by its own name
            tmp = entry / f".{RELAID_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(found), encoding="utf-8")
            os.replace(tmp, path)
        return found

    def _cache_overrides(self, relaid: dict) -> dict | None:
        """set_weights' weights under the names, and in the layout, the cached graph holds them (``relaid``: the
        cache entry's map); None when one of them is in the cached graph in no form sdrt can give."""
        out = {}
        for name, value in self.weights.items():
            if name in relaid["absent"]:
                return None
            r = relaid["relaid"].get(name)
            if r is None:
                out[name] = value
            else:
                out[r["name"]] = functools.partial(_relaid_value, value, r["layout"], r["block"])
        return out

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self.provider == "cuda":
            return self._run_bound(inputs)
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, host in inputs.items():
            held = self._on_device.get(name)
            if held is None or held[0] is not host:
                held = (host, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), "cuda", 0))
                self._on_device[name] = held
            binding.bind_ortvalue_input(name, held[1])
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(self.output_names, binding.get_outputs())}

    def close(self) -> None:
        self._on_device.clear()
        self.session = None
        self._shared = None  # after the session: it reads them
