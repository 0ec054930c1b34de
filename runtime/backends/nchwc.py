"""Convolution weights in ONNX Runtime's NCHWc layout, so that a LoRA applies to the optimized-graph cache.

ONNX Runtime's NCHWc pass (CPU, level ORT_ENABLE_ALL) replaces each Conv by ``com.microsoft.nchwc:Conv``
whose weight is a new initializer (``reorder_token_N``) holding the original weight padded to the
CPU's channel block B (16 with AVX-512, 8 with AVX2) and re-laid out by MLAS:

- ``OIHWBiBo`` (input channels a multiple of B): [O/B][I/B][kh][kw][B in][B out];
- ``OIHWBo`` (fewer input channels than a block, e.g. a UNet's conv_in): [O/B][I][kh][kw][B out].

When the cache is filled, each exported convolution weight is matched to its re-laid-out twin by value
(hash of the reordered exported weight against the hash of each new initializer), and the map is kept
beside the cached graph (``relaid.json``); a LoRA's merged weight is then reordered the same way and
handed to the cached graph under the twin's name. Reading the graph needs only its initializers' names,
shapes and external-data offsets: a few protobuf fields, read here without the onnx package (the runtime
does not depend on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RELAID_FILE = "relaid.json"
RELAID_VERSION = 2  # 2: with "prepacked"
LAYOUTS = ("OIHWBiBo", "OIHWBo")
_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}  # TensorProto.DataType


# -- a few fields of ONNX's protobuf ------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes otherwise."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def external_initializers(model_path: Path) -> dict[str, dict]:
    """name -> {dims, dtype, file, offset, length} of each initializer of an ONNX file kept in external data
    (ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto: dims 1, data_type 2, name 8,
    external_data 13 as key 1 / value 2 pairs)."""
    out = {}
    for field, _, graph in _fields(Path(model_path).read_bytes()):
        if field != 7:
            continue
        for gfield, _, tensor in _fields(graph):
            if gfield != 5:
                continue
            dims, dtype, name, ext = [], None, None, {}
            for tfield, wire, value in _fields(tensor):
                if tfield == 1:
                    if wire == 0:
                        dims.append(value)
                    else:  # packed
                        j = 0
                        while j < len(value):
                            d, j = _varint(value, j)
                            dims.append(d)
                elif tfield == 2:
                    dtype = value
                elif tfield == 8:
                    name = value.decode()
                elif tfield == 13:
                    kv = dict((f, v.decode()) for f, _, v in _fields(value))
                    ext[kv.get(1)] = kv.get(2)
            if name is not None and "location" in ext and dtype in _DTYPES:
                out[name] = {"dims": dims, "dtype": _DTYPES[dtype], "file": ext["location"],
                             "offset": int(ext.get("offset", 0)), "length": int(ext["length"])}
    return out


# ONNX Runtime's CPU kernels that copy a constant 2-D B input into a packed layout when the session is made
# (PrePack) and never read the initializer again
PREPACKING = {"MatMul", "FusedMatMul", "Gemm"}


def prepacked_initializers(model_path: Path) -> list[str]:
    """The initializers of ``model_path`` that ONNX Runtime's CPU provider reads only while it makes a session:
    2-D, and every use the B input (1) of a MatMul, FusedMatMul or Gemm, whose kernels pack it then (unless
    ``session.disable_prepacking``). None in a graph with subgraphs, whose uses are not all read here.
    (GraphProto.node = 1; NodeProto: input 1, op_type 4; TensorProto dims 1, name 8.)"""
    uses: dict[str, list[tuple[str, int]]] = {}
    two_d: set[str] = set()
    for field, _, graph in _fields(Path(model_path).read_bytes()):
        if field != 7:
            continue
        for gfield, _, message in _fields(graph):
            if gfield == 1:
                inputs, op = [], ""
                for nfield, _, value in _fields(message):
                    if nfield == 1:
                        inputs.append(value.decode())
                    elif nfield == 4:
                        op = value.decode()
                    elif nfield == 5 and any(a in (6, 11) for a, _, _ in _fields(value)):
                        return []  # a graph attribute (If, Loop, Scan): uses inside it are not read here
                for index, name in enumerate(inputs):
                    uses.setdefault(name, []).append((op, index))
            elif gfield == 5:
                dims, name = 0, None
                for tfield, wire, value in _fields(message):
                    if tfield == 1:
                        dims += 1 if wire == 0 else sum(1 for b in value if b < 0x80)
                    elif tfield == 8:
                        name = value.decode()
                if dims == 2 and name is not None:
                    two_d.add(name)
    return sorted(n for n in two_d if uses.get(n) and all(op in PREPACKING and i == 1 for op, i in uses[n]))


# -- the layouts ----------------------------------------------------------------------------------------


def _ceil(n: int, b: int) -> int:
    return -(-n // b) * b


def relaid_shape(shape, layout: str, block: int) -> list[int]:
    o, i, kh, kw = shape
    return [_ceil(o, block), _ceil(i, block) if layout == "OIHWBiBo" else i, kh, kw]


def reorder(w: np.ndarray, layout: str, block: int) -> np.ndarray:
    """An OIHW convolution weight in MLAS's ``layout`` with channel block ``block``, zero-padded, with the
    padded OIHW shape ONNX Runtime gives the initializer."""
    o, i, kh, kw = w.shape
    op, ip = relaid_shape(w.shape, layout, block)[:2]
    if (op, ip) != (o, i):
        padded = np.zeros((op, ip, kh, kw), w.dtype)
        padded[:o, :i] = w
        w = padded
    if layout == "OIHWBiBo":
        blocks = w.reshape(op // block, block, ip // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    else:
        blocks = w.reshape(op // block, block, ip, kh, kw).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(blocks).reshape(op, ip, kh, kw)


def _mapped(directory: Path, e: dict, shape_key: str) -> np.ndarray:
    return np.memmap(directory / e["file"], dtype=e["dtype"], mode="r", offset=e["offset"], shape=tuple(e[shape_key]))


def _ends(w: np.ndarray, layout: str, block: int) -> np.ndarray:
    """The first and the last block of ``reorder(w, layout, block)``, computed from the two corners of ``w``
    alone (a memory map: only their pages are read)."""
    o, i = w.shape[:2]
    op, ip = relaid_shape(w.shape, layout, block)[:2]
    first_i = block if layout == "OIHWBiBo" else i
    first = reorder(np.asarray(w[:block, :first_i]), layout, block)
    last = reorder(np.asarray(w[op - block:, ip - first_i:]), layout, block)
    return np.concatenate([first.ravel(), last.ravel()])


def _cached_ends(t: np.ndarray, size: int) -> np.ndarray:
    flat = t.reshape(-1)
    return np.concatenate([flat[:size], flat[-size:]])


def map_relaid(cached_model: Path, exported_dir: Path, weights_json: Path) -> dict:
    """Match the exported convolution weights (weights.json) that the optimized graph ``cached_model`` no longer
    holds by name to the re-laid-out initializers that replaced them: by value, on the first and last block of
    each (the pages between are never read), and on the whole tensor where two candidates share both.

    Returns {"relaid": {exported name: {name, layout, block, shape}}, "absent": [exported names found nowhere],
    "prepacked": [names ONNX Runtime packs when it makes a session, prepacked_initializers], "version"}.
    """
    cached = external_initializers(cached_model)
    entries = {e["initializer"]: e for e in json.loads(Path(weights_json).read_text(encoding="utf-8"))["weights"].values()}
    gone = {n: e for n, e in entries.items() if n not in cached}
    # candidates: 4-D initializers the exported graph did not have, by (shape, dtype)
    candidates: dict[tuple, list[str]] = {}
    for name, c in cached.items():
        if len(c["dims"]) == 4 and name not in entries:
            candidates.setdefault((tuple(c["dims"]), c["dtype"]), []).append(name)
    relaid, absent, taken, blocks = {}, [], set(), [16, 8]
    for name, e in gone.items():
        found = None
        for block in blocks if len(e["shape"]) == 4 else ():
            layout = "OIHWBiBo" if e["shape"][1] % block == 0 else "OIHWBo"
            shape = relaid_shape(e["shape"], layout, block)
            names = [n for n in candidates.get((tuple(shape), e["dtype"]), ()) if n not in taken]
            if not names:
                continue
            w = _mapped(exported_dir, e, "shape")
            want = _ends(w, layout, block)
            hits = [n for n in names if np.array_equal(_cached_ends(_mapped(cached_model.parent, cached[n], "dims"), want.size // 2), want)]
            if len(hits) > 1:  # equal ends: compare the whole tensors
                full = reorder(np.asarray(w), layout, block)
                hits = [n for n in hits if np.array_equal(_mapped(cached_model.parent, cached[n], "dims"), full)]
            if hits:
                found = {"name": hits[0], "layout": layout, "block": block, "shape": shape}
                blocks = [block] + [b for b in blocks if b != block]  # one CPU, one block size: try it first
                break
        if found:
            relaid[name] = found
            taken.add(found["name"])
        else:
            absent.append(name)
    return {"relaid": relaid, "absent": sorted(absent), "prepacked": prepacked_initializers(cached_model),
            "version": RELAID_VERSION}
