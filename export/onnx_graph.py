"""Trace a component to ONNX, clean the graph with the tools made for it, save it (with external
data past protobuf's 2 GB limit) and check it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from sdrt.runtime.files import default_mode, release_memory

from . import external as ext
from . import weights
from .components import Component

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_NAME = "model.onnx_data"


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s proto is past protobuf's 2 GB limit (its weights on disk not counted). ByteSize()
    itself fails there, so the initializers and nodes are measured one by one (each is far below the limit)."""
    g = model.graph
    size = sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node)
    return size > PROTOBUF_LIMIT - (64 << 20)  # headroom for graph metadata


def _too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` with every weight inside would be past protobuf's 2 GB limit."""
    return ext.data_bytes(model) + sum(n.ByteSize() for n in model.graph.node) > PROTOBUF_LIMIT - (64 << 20)


def trace(comp: Component, path: Path, opset: int = OPSET) -> None:
    """torch -> ONNX with named dynamic axes (TorchScript exporter: the path TensorRT's and ONNX
    Runtime's own Stable Diffusion tools use, and whose dynamic_axes naming we keep), at the component's
    trace shape. Without the tracer's constant folding: it would make a transposed copy of every Linear
    weight while the module still holds the original (1.8x a UNet's weights in memory); those transposes
    are folded afterwards, one weight at a time (fold_weight_transposes), and the rest by polygraphy."""
    sample = comp.sample(*comp.trace_shape)
    names_in = [t.name for t in comp.inputs]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            comp.module,
            sample,
            str(path),
            dynamo=False,
            input_names=names_in,
            output_names=[t.name for t in comp.all_outputs],
            dynamic_axes=comp.dynamic_axes,
            opset_version=opset,
            do_constant_folding=False,
        )


def export_graph(comp: Component, dest: Path, opset: int = OPSET, fp16: bool = False, lora: bool = False,
                 release: Callable[[], None] = lambda: None) -> bool:
    """Trace ``comp``, clean and optimize the graph, optionally convert it to fp16, save it at
    ``dest`` and check it. Returns whether the weights went to external data. With ``lora`` the
    weights always go to external data and the weight map (export/weights.py) is written beside it.
    ``release`` is called as soon as the torch module's weights are no longer needed (before the fp16
    conversion and the save), so that a caller can free them.

    Memory matters at real sizes (an SDXL UNet is 10.3 GB of fp32 weights): the weights the tracer
    wrote stay on disk while the graph is worked on, and each is read once, alone, to be saved
    (export/external.py).
    """
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".trace-") as scratch:
        scratch = Path(scratch)
        raw = scratch / "model.onnx"
        trace(comp, raw, opset)
        model = onnx.load(str(raw), load_external_data=False)
        ext.offload(model, scratch)
        fold_weight_transposes(model, scratch)
        model = _optimized(model, scratch)
        mapped = weights.map_weights(comp.module, model, scratch) if lora else None  # on the fp32 values
        release()
        release_memory()
        add_input_defaults(model, comp.defaults)
        model, convert = to_fp16(model) if fp16 else (model, {})
        external = save(model, dest, scratch, external=lora or None, convert=convert)
    if mapped is not None:
        weights.write_weight_map(*mapped, dest)
    return external


def fold_weight_transposes(model: onnx.ModelProto, base: Path) -> None:
    """Replace each Transpose of an initializer (the tracer's Linear -> MatMul(x, Transpose(W))) by the
    transposed initializer, made one weight at a time and written to its own file under ``base``; an
    initializer no longer used is dropped (and its file, the tracer's, removed)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    kept, folded = [], []
    for node in graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if t is None:
            kept.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        a = ext.read(t, base)
        folded.append(ext.tensor(node.output[0], a.transpose(perm), base / f"folded_{len(folded)}.bin", base))
        del a
        uses[t.name] -= 1
        if not uses[t.name]:
            graph.initializer.remove(t)
            if ext.is_external(t):
                (base / ext.info(t)["location"]).unlink(missing_ok=True)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)


def add_input_defaults(model: onnx.ModelProto, defaults: dict) -> None:
    """Give graph inputs a value to take when the caller leaves them out: an initializer of the input's
    name (ONNX IR >= 4; ONNX Runtime lists such inputs under get_overridable_initializers, not get_inputs)."""
    from onnx import numpy_helper

    names = {i.name for i in model.graph.input}
    for name, value in defaults.items():
        if name in names:
            model.graph.initializer.append(numpy_helper.from_array(value, name))


@contextlib.contextmanager
def _working_directory(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _optimized(model: onnx.ModelProto, base: Path) -> onnx.ModelProto:
    """onnx-graphsurgeon cleanup + toposort, polygraphy constant folding, shape inference, on the
    graph with its large weights left in their external files under ``base``."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    _quiet_tools()
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph
    # Polygraphy hands the model to ONNX Runtime as bytes, and ONNX Runtime then resolves external
    # weights against the working directory: run there, so subgraphs that fold weights still fold.
    with _working_directory(base):
        model = fold_constants(model, error_ok=True)
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph))
    return model


def _quiet_tools() -> None:
    """Polygraphy reports every folding pass and ONNX Runtime warns about fusions it skips; the
    exporter prints its own per-component progress instead."""
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """fp16 weights and compute, fp32 inputs and outputs, with ONNX Runtime's converter (its fork of
    onnxconverter-common keeps Cast nodes consistent; the original leaves the UNet's timestep
    projection Cast typed float32 with a float16 output, which no runtime loads).

    The converter retypes a weight on disk without reading it (it converts raw data only); it would read
    one to learn its shape, which it is given from the tensor's dims instead. Returns the converted model
    and what ``save`` needs to convert those weights as it streams them: {name: (float32, the converter's
    own rounding)}."""
    from unittest import mock

    from onnx import helper
    from onnxruntime.transformers import float16

    on_disk = {t.name for t in model.graph.initializer if ext.is_external(t) and t.data_type == onnx.TensorProto.FLOAT}
    with mock.patch.object(float16, "make_value_info_from_tensor",
                           lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))):
        model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=is_large(model))
    _toposort_in_place(model.graph)  # the converter appends the input Casts at the end
    return model, {t.name: (np.float32, float16.convert_np_to_float16) for t in model.graph.initializer
                   if t.name in on_disk and t.data_type == onnx.TensorProto.FLOAT16}


def _toposort_in_place(graph: onnx.GraphProto) -> None:
    """Kahn's algorithm over the node list, keeping the existing order among ready nodes. Done on the
    protos directly: a graphsurgeon round trip would copy every weight of a multi-GB graph."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting = {}  # tensor name -> indices of nodes that still wait for it
    missing = []
    for idx, node in enumerate(graph.node):
        need = {name for name in node.input if name not in available}
        missing.append(len(need))
        for name in need:
            waiting.setdefault(name, []).append(idx)
    ready = [idx for idx, n in enumerate(missing) if n == 0]
    order = []
    while ready:
        idx = ready.pop(0)
        order.append(idx)
        for out in graph.node[idx].output:
            for j in waiting.pop(out, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if len(order) != len(graph.node):
        raise ValueError("the graph has a cycle or an input no node produces")
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def save(model: onnx.ModelProto, path: Path, base: Path, external: bool | None = None, convert: dict | None = None) -> bool:
    """Save ``model`` at ``path``; past 2 GB (or when ``external`` says so) the weights go to one
    external file beside it, streamed from their scratch files under ``base``, which are consumed (``convert``:
    weights to convert on the way, ``to_fp16``). Returns whether external data was used. The saved model is
    checked by path."""
    path = Path(path)
    external = _too_large(model) if external is None else external
    ext.save(model, path, base, EXTERNAL_DATA_NAME, external, convert, consume=True)
    del model
    release_memory()
    if external:
        os.chmod(path.parent / EXTERNAL_DATA_NAME, default_mode())
    onnx.checker.check_model(str(path))  # the path-based checker follows external data
    return external
