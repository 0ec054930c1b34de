"""Trace a component to ONNX, clean the graph with the tools made for it, save it (with external
data past protobuf's 2 GB limit) and check it."""

from __future__ import annotations

import os
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


def export_graph(comp: Component, dest: Path, opset: int = OPSET, fp16: bool = False) -> bool:
    """Trace ``comp``, clean and optimize the graph, optionally convert it to fp16, save it at
    ``dest`` and check it. Returns whether the weights went to external data.

    Memory matters at real sizes (an SD 1.5 UNet is 3.4 GB of fp32 weights): each stage drops the
    previous stage's copy before the next one is made.
    """
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".trace-") as scratch:
        raw = Path(scratch) / "model.onnx"
        trace(comp, raw, opset)
        model = _optimized(raw)
    if fp16:
        model = to_fp16(model)
    return save(model, dest)


def _optimized(raw: Path) -> onnx.ModelProto:
    """onnx-graphsurgeon cleanup + toposort, polygraphy constant folding, shape inference."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    _quiet_tools()
    graph = gs.import_onnx(onnx.load(str(raw)))  # pulls in any external data the tracer wrote
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph  # the traced model's tensors go with it
    large = is_large(model)
    # Polygraphy evaluates foldable subgraphs with ONNX Runtime. Past 2 GB its shape-inference
    # passes would each export, save and reload the whole model (~5x its size in memory for an
    # SD 1.5 UNet); there shapes are inferred once, by path, in save().
    model = fold_constants(model, do_shape_inference=not large, error_ok=True)
    release_memory()
    graph = gs.import_onnx(model)
    del model
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph
    release_memory()
    return model if large else onnx.shape_inference.infer_shapes(model)


def release_memory() -> None:
    """Hand freed heap back to the OS: protobuf copies of a multi-GB graph leave glibc's arenas
    large, and the next stage (validation loads the graph into ONNX Runtime) should not pay for them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _quiet_tools() -> None:
    """Polygraphy reports every folding pass and ONNX Runtime warns about fusions it skips; the
    exporter prints its own per-component progress instead."""
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs (onnxconverter-common)."""
    from onnxconverter_common import float16

    large = is_large(model)
    return float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)


def _chmod_like_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
        del model
        release_memory()
        # Shape inference by path: the weights stay on disk instead of being loaded again.
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        _chmod_like_umask(path.parent / EXTERNAL_DATA_NAME)  # onnx writes it private
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # the path-based checker follows external data
    return external
