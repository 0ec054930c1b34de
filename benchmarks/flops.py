"""FLOPs of an ONNX graph at one input shape, counted from the graph itself.

The graph is read without its external data (``load_external_data=False``: a 3.4 GB UNet costs a few
MB; only small integer tensors such as Reshape shapes are read from the data file), its named dynamic input dimensions are fixed to the benchmark's shape, ONNX shape inference (with
data propagation, for the Shape -> Concat -> Reshape chains of attention) fills in every tensor's shape,
and the multiply-accumulates of the ops that dominate a diffusion model are summed:

- ``Conv``: output elements x (C_in / group) x kernel area,
- ``ConvTranspose``: input elements x (C_out / group) x kernel area,
- ``MatMul`` (attention's Q.K^T and P.V included, as exported) and ``Gemm``: M x N x K per batch entry,
- ``Attention`` (opset 23, if present): the two attention matmuls.

FLOPs = 2 x MACs. Normalisations, activations, softmax and elementwise ops are not counted (they are
memory-bound and a few percent of the arithmetic at most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention")


@dataclass
class FlopCount:
    flops: int = 0
    by_op: dict = field(default_factory=dict)  # op type -> FLOPs
    nodes: dict = field(default_factory=dict)  # op type -> nodes counted
    unresolved: list = field(default_factory=list)  # names of counted-type nodes whose shapes stayed unknown

    def as_dict(self) -> dict:
        return {"flops": self.flops, "by_op": dict(self.by_op), "nodes": dict(self.nodes),
                "unresolved_nodes": list(self.unresolved)}


def _shape_of(value_info) -> list | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            return None
    return dims


def fix_input_dims(model, dims: dict[str, int] | None = None, shapes: dict[str, list[int]] | None = None):
    """Give the graph inputs concrete shapes: ``shapes`` by input name, else ``dims`` by dim_param name.
    Returns the model (modified in place)."""
    dims, shapes = dims or {}, shapes or {}
    initializers = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        if inp.name in shapes:
            new = list(shapes[inp.name])
            del tt.shape.dim[:]
            for v in new:
                tt.shape.dim.add().dim_value = int(v)
            continue
        for d in tt.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])  # setting the oneof clears dim_param
    return model


def infer(model):
    """Shape inference over the graph (existing value_info dropped: it carries the symbolic dims)."""
    from onnx import shape_inference

    del model.graph.value_info[:]
    return shape_inference.infer_shapes(model, data_prop=True)


def count_flops(model) -> FlopCount:
    """FLOPs of one run of ``model`` (an inferred ModelProto with concrete shapes)."""
    shapes: dict[str, list[int] | None] = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        shapes[vi.name] = _shape_of(vi)
    for init in model.graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = [int(d) for d in a.t.dims]

    result = FlopCount()
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        macs = _macs(node, shapes)
        if macs is None:
            result.unresolved.append(node.name or node.op_type)
            continue
        result.by_op[node.op_type] = result.by_op.get(node.op_type, 0) + 2 * macs
        result.nodes[node.op_type] = result.nodes.get(node.op_type, 0) + 1
        result.flops += 2 * macs
    return result


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _macs(node, shapes) -> int | None:
    def s(i):
        return shapes.get(node.input[i]) if i < len(node.input) and node.input[i] else None

    def out(i=0):
        return shapes.get(node.output[i]) if i < len(node.output) else None

    op = node.op_type
    if op == "Conv":
        y, w = out(), s(1)
        if y is None or w is None:
            return None
        return math.prod(y) * math.prod(w[1:])  # W: (C_out, C_in / group, k...)
    if op == "ConvTranspose":
        x, w = s(0), s(1)
        if x is None or w is None:
            return None
        return math.prod(x) * math.prod(w[1:])  # W: (C_in, C_out / group, k...)
    if op == "MatMul":
        a, y = s(0), out()
        if a is None or y is None or not a:
            return None
        return math.prod(y) * a[-1]
    if op == "Gemm":
        a, y = s(0), out()
        if a is None or y is None or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return math.prod(y) * k
    if op == "Attention":  # Q (B, H, Lq, D) or (B, Lq, H*D); K, V alike
        q, k, v = s(0), s(1), s(2)
        if q is None or k is None or v is None:
            return None
        if len(q) == 4:
            b, h, lq, d = q
            lk, dv = k[-2], v[-1]
            return b * h * lq * lk * (d + dv)
        if len(q) != 3:
            return None
        b, lq, hd = q  # heads folded into the last dim: per head D x Lq x Lk, summed over heads
        lk, hdv = k[1], v[-1]
        return b * lq * lk * (hd + hdv)
    return None


def load_small_external_ints(model, base_dir: Path, max_elements: int = 64) -> None:
    """Read the few small integer initializers (Reshape shapes, Gather indices) kept in external data, so
    shape inference can follow them; the weights stay unread. Only these tensors' bytes are read."""
    from onnx import TensorProto

    ints = (TensorProto.INT64, TensorProto.INT32)
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL or init.data_type not in ints:
            continue
        if math.prod(init.dims) > max_elements:
            continue
        info = {e.key: e.value for e in init.external_data}
        try:
            with open(base_dir / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]) if "length" in info else math.prod(init.dims) * 8)
        except (OSError, KeyError, ValueError):
            continue
        init.raw_data = raw
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT


def graph_flops(path: str | Path, dims: dict[str, int] | None = None,
                shapes: dict[str, list[int]] | None = None) -> FlopCount:
    """FLOPs of the ONNX file at ``path`` with its dynamic inputs fixed (by dim name or input name).
    External weights are never read (small integer tensors excepted: see load_small_external_ints)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    load_small_external_ints(model, Path(path).parent)
    return count_flops(infer(fix_input_dims(model, dims, shapes)))


def unet_flops(model_dir: str | Path, manifest: dict, *, batch: int, height: int, width: int,
               guidance: bool) -> dict:
    """FLOPs of one UNet call of the pipeline at this batch and size (batch doubled under guidance), with
    one 77-token chunk of text conditioning."""
    rec = manifest["components"]["unet"]
    f = manifest.get("vae_scale_factor", 8)
    unet_batch = batch * (2 if guidance else 1)
    dims = {"batch": unet_batch, "latent_height": height // f, "latent_width": width // f, "text_length": 77}
    shapes = {}
    for spec in rec.get("inputs", []):  # any other named dim the manifest records is fixed by name
        shape = spec.get("shape") or []
        if all(isinstance(d, int) or d in dims for d in shape):
            shapes[spec["name"]] = [d if isinstance(d, int) else dims[d] for d in shape]
    count = graph_flops(Path(model_dir) / rec["file"], dims, shapes)
    return {"unet_batch": unet_batch, "latent_shape": [unet_batch, manifest.get("latent_channels", 4),
                                                      height // f, width // f], **count.as_dict()}
