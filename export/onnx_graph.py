"""Trace a component to ONNX, clean the graph with the tools made for it, save it (with external
data past protobuf's 2 GB limit) and check it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

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
            output_names=[t.name for t in comp.outputs],
            dynamic_axes=comp.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon cleanup + toposort, polygraphy constant folding, shape inference."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    _quiet_tools()
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    large = is_large(model)
    # Polygraphy evaluates foldable subgraphs with ONNX Runtime; past 2 GB it cannot serialize the
    # model for ONNX Runtime's shape inference, so that part is left to onnx's own.
    model = fold_constants(model, allow_onnxruntime_shape_inference=not large, error_ok=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    return infer_shapes(model)


def _quiet_tools() -> None:
    """Polygraphy reports every folding pass and ONNX Runtime warns about fusions it skips; the
    exporter prints its own per-component progress instead."""
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save(model, src)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst))
        return onnx.load(str(dst))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs (onnxconverter-common)."""
    from onnxconverter_common import float16

    large = is_large(model)
    return float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)


def save(model: onnx.ModelProto, path: Path) -> bool:
    """Save ``model`` at ``path``; past 2 GB the weights go to one external file beside it.
    Returns whether external data was used. The saved model is checked by path."""
    path = Path(path)
    external = is_large(model)
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
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # the path-based checker follows external data
    return external
