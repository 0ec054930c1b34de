"""Trace a component to ONNX, clean the graph with the tools made for it, save it (with external
data past protobuf's 2 GB limit) and check it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from sdrt.runtime.files import default_mode, release_memory

from . import weights
from .components import Component

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_NAME = "model.onnx_data"


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is past protobuf's 2 GB limit. ByteSize() itself fails there, so the
    initializers and nodes are measured one by one (each is far below the limit)."""
    g = model.graph
    size = sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node)
    return size > PROTOBUF_LIMIT - (64 << 20)  # headroom for graph metadata


def trace(comp: Component, path: Path, opset: int = OPSET) -> None:
    """torch -> ONNX with named dynamic axes (TorchScript exporter: the path TensorRT's and ONNX
    Runtime's own Stable Diffusion tools use, and whose dynamic_axes naming we keep)."""
    sample = comp.sample(*comp.validation_shapes[0])
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
            do_constant_folding=True,
        )


def export_graph(comp: Component, dest: Path, opset: int = OPSET, fp16: bool = False, lora: bool = False) -> bool:
    """Trace ``comp``, clean and optimize the graph, optionally convert it to fp16, save it at
    ``dest`` and check it. Returns whether the weights went to external data. With ``lora`` the
    weights always go to external data and the weight map (export/weights.py) is written beside it.

    Memory matters at real sizes (an SD 1.5 UNet is 3.4 GB of fp32 weights): the graph is
    optimized while the weights the tracer wrote stay on disk, and they are read into memory
    once, to be saved.
    """
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".trace-") as scratch:
        raw = Path(scratch) / "model.onnx"
        trace(comp, raw, opset)
        model = _optimized(raw)
        onnx.load_external_data_for_model(model, scratch)  # no-op when the tracer embedded them
    add_input_defaults(model, comp.defaults)
    mapped = weights.map_weights(comp.module, model) if lora else None  # on the fp32 values
    if fp16:
        model = to_fp16(model)
    external = save(model, dest, external=lora or None)
    if mapped is not None:
        weights.write_weight_map(*mapped, dest)
    return external


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


def _optimized(raw: Path) -> onnx.ModelProto:
    """onnx-graphsurgeon cleanup + toposort, polygraphy constant folding, shape inference, on the
    graph with its large weights left in the tracer's external files."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    _quiet_tools()
    graph = gs.import_onnx(onnx.load(str(raw), load_external_data=False))
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph
    # Polygraphy hands the model to ONNX Runtime as bytes, and ONNX Runtime then resolves external
    # weights against the working directory: run there, so subgraphs that fold weights still fold.
    with _working_directory(raw.parent):
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


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs, with ONNX Runtime's converter (its fork of
    onnxconverter-common keeps Cast nodes consistent; the original leaves the UNet's timestep
    projection Cast typed float32 with a float16 output, which no runtime loads)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=is_large(model))
    _toposort_in_place(model.graph)  # the converter appends the input Casts at the end
    return model


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


def save(model: onnx.ModelProto, path: Path, external: bool | None = None) -> bool:
    """Save ``model`` at ``path``; past 2 GB (or when ``external`` says so) the weights go to one
    external file beside it. Returns whether external data was used. The saved model is checked by path."""
    path = Path(path)
    external = is_large(model) if external is None else external
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
            size_threshold=1024,
            convert_attribute=False,
        )
        del model
        release_memory()
        os.chmod(path.parent / EXTERNAL_DATA_NAME, default_mode())  # onnx writes it private
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # the path-based checker follows external data
    return external
