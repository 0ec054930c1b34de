"""``sdrt build``: TensorRT engines for this GPU from a model directory's ONNX graphs.

One engine per component, with one optimization profile computed from the user's ranges and the
manifest's named dimensions (export.profiles). Plans go to ``engines/<gpu-key>/<component>.plan``,
each written atomically, and are recorded in sdrt.json (rewritten atomically after every engine).
An engine already built for the same key, ONNX, profile and precision is reused unless ``force``.
``refittable`` builds with TensorRT's REFIT flag (the weights stay in the plan and can be replaced at run
time, e.g. for LoRA: TrtEngine.set_weights); a non-refittable engine is not reused for such a build.

Needs TensorRT and cuda-python, imported lazily; never torch. The TensorRT calls sit behind a small
builder object (``facts``, ``has_fp16_flag``, ``build(...)``) so everything else is testable without.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sdrt.runtime.engines import DeviceFacts, engine_dir, gpu_key, onnx_hashes, plan_relpath
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.files import write_atomic, write_json_atomic
from sdrt.runtime.manifest import ModelDirError, load_manifest

from .profiles import RangeError, profiles, resolve_ranges, reuse_decision


class BuildError(SdrtError, RuntimeError):
    """A build that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str  # what the engine computes in: "fp16" or "fp32" (TF32 allowed)
    strongly_typed: bool  # the network takes its types from the ONNX graph
    fp16_flag: bool  # TensorRT 10 weak typing: let the builder pick fp16 kernels
    note: str | None = None


def plan_precision(component: str, onnx_precision: str, *, fp16_vae: bool, has_fp16_flag: bool) -> PrecisionPlan:
    """fp16 for the text encoders and the UNet, fp32 (TF32) for the VAE unless ``fp16_vae``.

    An fp16 ONNX graph (``sdrt export --fp16``) is built strongly typed: the graph carries its types.
    An fp32 graph that should run in fp16 uses the builder's FP16 flag where TensorRT still has it
    (10.x, weakly typed); TensorRT 11 has strong typing only, so it stays fp32 there, with a note."""
    want_fp16 = not component.startswith("vae") or fp16_vae
    if onnx_precision == "fp16":
        note = None if want_fp16 else "the ONNX graph is fp16 (exported with --fp16-vae), so the engine is too"
        return PrecisionPlan("fp16", True, False, note)
    if want_fp16 and has_fp16_flag:
        return PrecisionPlan("fp16", False, True)
    if want_fp16:
        return PrecisionPlan(
            "fp32", True, False,
            "this TensorRT builds strongly typed networks only (no FP16 flag): the fp32 graph gives an fp32 engine; "
            "re-export with `sdrt export --fp16` for fp16",
        )
    return PrecisionPlan("fp32", not has_fp16_flag, False)


# -- the TensorRT side --------------------------------------------------------------------------


@contextlib.contextmanager
def _inputs_required(onnx_path: Path):
    """The graph at ``onnx_path``, or a copy beside it (so its external data still resolves) without the
    initializers that give some inputs a default (a text encoder's attention mask: export/components.py).
    TensorRT folds such an input in as a constant, and the engine would lack an input the runtime feeds."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        yield onnx_path  # unreadable: TensorRT's parser says why
        return
    names = {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name not in names]
    if len(keep) == len(model.graph.initializer):
        yield onnx_path
        return
    copies = [onnx.TensorProto() for _ in keep]
    for copy, t in zip(copies, keep):
        copy.CopyFrom(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(copies)
    tmp = onnx_path.with_name(f".{onnx_path.stem}.trt-{os.getpid()}.onnx")
    try:
        onnx.save_model(model, str(tmp))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


class TensorRTBuilder:
    """Builds serialized engines with the TensorRT Python API (10.x and 11.x)."""

    def __init__(self):
        from sdrt.runtime.backends.tensorrt import device_facts, import_tensorrt

        self.trt, _ = import_tensorrt("sdrt build")
        self.facts = device_facts("sdrt build")
        self.has_fp16_flag = hasattr(self.trt.BuilderFlag, "FP16")

    def build(self, onnx_path: Path, profile: dict, plan: PrecisionPlan, *, timing_cache: bytes | None,
              optimization_level: int | None, workspace_gib: float | None,
              refittable: bool = False) -> tuple[bytes, bytes | None]:
        """(serialized engine, updated timing cache or None when no cache was given)."""
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if plan.strongly_typed and strongly is not None:
            flags |= 1 << int(strongly)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        with _inputs_required(onnx_path) as path:
            parsed = parser.parse_from_file(str(path))  # external data is read from beside the file
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}")
        config = builder.create_builder_config()
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if plan.fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT)  # weights stay in the plan; trt.Refitter can replace them
        prof = builder.create_optimization_profile()
        for name, shapes in profile.items():
            prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(prof)
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError(
                f"TensorRT could not build an engine from {onnx_path} (see its log above); "
                "a smaller profile (--max-height/--max-width/--max-batch) or a larger --workspace may help"
            )
        new_cache = bytes(memoryview(config.get_timing_cache().serialize())) if timing_cache is not None else None
        return bytes(memoryview(serialized)), new_cache


# -- the build ----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


class _Heartbeat:
    """Says every ``every`` seconds that a long build is still going, with the elapsed time."""

    def __init__(self, log, label: str, every: float = 30.0):
        self.log, self.label, self.every = log, label, every
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.log(f"    {self.label}: still building, {_fmt_time(time.perf_counter() - self._t0)} so far")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _fmt_time(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m {s % 60:02.0f}s"


def _describe_profile(profile: dict) -> str:
    return ", ".join(
        f"{n} {'x'.join(map(str, p['min']))}" + ("" if p["min"] == p["max"] else f"..{'x'.join(map(str, p['max']))}")
        for n, p in profile.items()
    )


def build_engines(
    model_dir: str | os.PathLike,
    *,
    components: list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    min_height: int | None = None,
    max_height: int | None = None,
    min_width: int | None = None,
    max_width: int | None = None,
    batch: int | None = None,
    max_batch: int | None = None,
    static: bool = False,
    fp16_vae: bool = False,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int | None = None,
    workspace_gib: float | None = None,
    force: bool = False,
    refittable: bool = False,
    builder=None,
    log=print,
) -> list[dict]:
    """Build (or reuse) one engine per component; returns one summary row per component:
    {component, status ("built" or "reused"), precision, file, size_bytes, build_seconds, reason}.

    ``refittable``: engines whose weights can be replaced at run time (TensorRT refit); an existing engine
    that is not refittable is rebuilt, a refittable one also serves a build without it.
    Ranges are validated before TensorRT is touched (RangeError). ``builder`` defaults to
    :class:`TensorRTBuilder` (BackendUnavailable without TensorRT or a GPU)."""
    root = Path(model_dir)
    manifest = load_manifest(root)
    available = list(manifest["components"])
    if components:
        unknown = [c for c in components if c not in available]
        if unknown:
            raise BuildError(f"unknown component(s) {', '.join(unknown)}; {root} has {', '.join(available)}")
        selected = [c for c in available if c in components]
    else:
        selected = available
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise RangeError(f"--optimization-level must be 0..5, got {optimization_level}")
    if workspace_gib is not None and workspace_gib <= 0:
        raise RangeError(f"--workspace must be a positive number of GiB, got {workspace_gib}")
    ranges = resolve_ranges(
        manifest, height=height, width=width, min_height=min_height, max_height=max_height,
        min_width=min_width, max_width=max_width, batch=batch, max_batch=max_batch, static=static,
    )
    profs = profiles(manifest, selected, ranges)
    for comp in selected:
        rec = manifest["components"][comp]
        for f in (rec["file"], rec.get("external_data")):
            if f and not (root / f).is_file():
                raise ModelDirError(f"{root / f} is missing; re-export the model with `sdrt export --overwrite`")

    if builder is None:
        builder = TensorRTBuilder()
    facts: DeviceFacts = builder.facts
    key = gpu_key(facts)
    out_dir = engine_dir(root, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = None
    if cache_path is not None:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""

    log(f"building TensorRT engines for {facts.describe()} into {out_dir}")
    log(f"  height {ranges.height[0]}..{ranges.height[2]} (opt {ranges.height[1]}), "
        f"width {ranges.width[0]}..{ranges.width[2]} (opt {ranges.width[1]}), "
        f"batch {ranges.batch[0]}..{ranges.batch[2]} (opt {ranges.batch[1]}){', static' if static else ''}")
    rows = []
    t_all = time.perf_counter()
    for i, comp in enumerate(selected, 1):
        rec = manifest["components"][comp]
        plan = plan_precision(comp, rec.get("precision", "fp32"), fp16_vae=fp16_vae, has_fp16_flag=builder.has_fp16_flag)
        profile = profs[comp]
        entry = (manifest.get("engines") or {}).get(key) or {}
        existing = (entry.get("components") or {}).get(comp)
        same_machine = entry.get("tensorrt_version") == facts.tensorrt_version
        reuse, reason = reuse_decision(existing if same_machine else None, component_record=rec, profile=profile,
                                       precision=plan.precision, model_dir=root, force=force)
        if reuse and refittable and not existing.get("refittable"):
            reuse, reason = False, "the engine is not refittable (--refittable)"
        tag = f"[{i}/{len(selected)}] {comp}"
        if reuse:
            log(f"{tag}: up to date ({existing['file']}, {existing['size_bytes'] / 2**20:.1f} MiB), reused")
            rows.append({"component": comp, "status": "reused", "precision": existing["precision"],
                         "file": existing["file"], "size_bytes": existing["size_bytes"],
                         "build_seconds": existing.get("build_seconds"), "reason": reason})
            continue
        kind = f"{plan.precision} refittable" if refittable else plan.precision
        log(f"{tag}: building {kind} engine ({reason}); profile {_describe_profile(profile)}")
        if plan.note:
            log(f"{tag}: note: {plan.note}")
        t0 = time.perf_counter()
        with _Heartbeat(log, comp):
            data, new_cache = builder.build(
                root / rec["file"], profile, plan, timing_cache=cache_bytes,
                optimization_level=optimization_level, workspace_gib=workspace_gib, refittable=refittable,
            )
        seconds = time.perf_counter() - t0
        rel = plan_relpath(key, comp)
        _write_atomic(root / rel, data)
        if cache_path is not None and new_cache is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(cache_path, new_cache)
            cache_bytes = new_cache
        record = {
            "file": rel,
            "precision": plan.precision,
            "strongly_typed": plan.strongly_typed,
            "profile": profile,
            "ranges": ranges.as_dict(),
            **onnx_hashes(rec),
            "build_seconds": round(seconds, 3),
            "built_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),  # checked by the backend before it deserializes the plan
            "optimization_level": optimization_level,
            "refittable": bool(refittable),
        }
        _record(root, key, facts, comp, record)
        manifest = load_manifest(root)
        log(f"{tag}: built in {_fmt_time(seconds)}, {len(data) / 2**20:.1f} MiB -> {rel}")
        rows.append({"component": comp, "status": "built", "precision": plan.precision, "file": rel,
                     "size_bytes": len(data), "build_seconds": seconds, "reason": reason})
    log(f"done in {_fmt_time(time.perf_counter() - t_all)}")
    return rows


def _record(root: Path, key: str, facts: DeviceFacts, component: str, record: dict) -> None:
    """Put one engine's record into sdrt.json (re-read first, rewritten atomically)."""
    manifest = load_manifest(root)
    engines = manifest.setdefault("engines", {}) or {}
    manifest["engines"] = engines
    entry = engines.get(key)
    if not entry or entry.get("tensorrt_version") != facts.tensorrt_version or entry.get("gpu_name") != facts.gpu_name:
        entry = {"components": {}}
    entry.update({
        "gpu_name": facts.gpu_name,
        "compute_capability": facts.compute_capability,
        "tensorrt_version": facts.tensorrt_version,
    })
    entry.setdefault("components", {})[component] = record
    engines[key] = entry
    write_json_atomic(root / "sdrt.json", manifest)


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'component':<16}{'precision':>10}{'size MiB':>11}{'build':>10}  status"]
    for r in rows:
        t = r.get("build_seconds")
        lines.append(
            f"{r['component']:<16}{r['precision']:>10}{r['size_bytes'] / 2**20:>11.1f}"
            f"{(_fmt_time(t) if t is not None else '-'):>10}  {r['status']}"
        )
    return "\n".join(lines)
