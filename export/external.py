"""Graph weights that stay on disk while the graph is worked on: read one at a time, written one at a time.

A real-size UNet's weights (10.3 GB for SDXL's in fp32) are more than a 24 GiB machine can hold twice, and
onnx's own ``load_external_data_for_model`` / ``save_model`` hold all of them in the ModelProto at once. Here
the proto keeps only each large tensor's external-data record (file, offset, length); a pass that changes a
weight (a folded transpose, an fp16 cast) reads that one tensor, writes its result, and lets it go; the
graph is saved by streaming each tensor into the final data file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 64 << 10  # data offsets of large tensors aligned to 64 KiB: ONNX Runtime maps aligned external data
ALIGN_FROM = 1 << 20  # ... for tensors of at least 1 MiB
EMBED_BELOW = 1024  # tensors smaller than this stay inside the .onnx (as onnx.save_model's size_threshold)


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def info(t: TensorProto) -> dict:
    """An external tensor's record: location (relative to the model's folder), offset, length."""
    return {e.key: e.value for e in t.external_data}


def nbytes(t: TensorProto) -> int:
    """The tensor's data size in bytes, wherever it lies (the tracer's records give no length: from the dims)."""
    if not is_external(t):
        return t.ByteSize()
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def data_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in model.graph.initializer)


def read(t: TensorProto, base: Path, dtype=None, mmap: bool = False) -> np.ndarray:
    """The tensor's values, from its raw data or from its external file under ``base`` (with ``mmap``, mapped
    rather than read: for a look at a few values); ``dtype``: the dtype the bytes hold when not the tensor's
    own (a tensor retyped to fp16 whose data is still the fp32 original)."""
    dtype = np.dtype(dtype or helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(t.dims)
    if not is_external(t):
        if t.raw_data:
            return np.frombuffer(t.raw_data, dtype=dtype).reshape(shape)
        return onnx.numpy_helper.to_array(t)
    record = info(t)
    count = int(np.prod(shape, dtype=np.int64))
    if mmap:
        return np.memmap(Path(base) / record["location"], dtype=dtype, mode="r", offset=int(record.get("offset", 0)),
                         shape=shape)
    return np.fromfile(Path(base) / record["location"], dtype=dtype, count=count,
                       offset=int(record.get("offset", 0))).reshape(shape)


def _point(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` an external tensor whose data lies in ``location`` at ``offset``."""
    t.ClearField("raw_data")
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL


def tensor(name: str, array: np.ndarray, path: Path, base: Path) -> TensorProto:
    """A TensorProto named ``name`` holding ``array``: embedded when small, else written alone to the file
    ``path`` (under ``base``, which the record's location is relative to)."""
    array = np.ascontiguousarray(array)
    if array.nbytes < EMBED_BELOW:
        return onnx.numpy_helper.from_array(array, name)
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    with open(path, "wb") as f:
        array.tofile(f)
    _point(t, os.path.relpath(path, base), 0, array.nbytes)
    return t


def offload(model: onnx.ModelProto, base: Path) -> None:
    """Move every tensor of ``model`` embedded in it and of ``EMBED_BELOW`` bytes or more to its own file under
    ``base``: the tracer embeds the weights of a graph under 2 GB, which every copy of the proto (graphsurgeon,
    polygraphy, the ONNX Runtime sessions that fold constants) would then copy too."""
    for i, t in enumerate(model.graph.initializer):
        if not is_external(t) and t.ByteSize() >= EMBED_BELOW and t.raw_data:
            path = Path(base) / f"offloaded_{i}.bin"
            path.write_bytes(t.raw_data)
            _point(t, path.name, 0, len(t.raw_data))


def save(model: onnx.ModelProto, path: Path, base: Path, data_name: str, external: bool,
         convert: dict | None = None, consume: bool = False) -> None:
    """Write ``model`` to ``path``: with ``external``, every tensor of ``EMBED_BELOW`` bytes or more goes to the one
    file ``data_name`` beside it, streamed a tensor at a time (large ones at aligned offsets); without, every
    tensor is embedded (a graph under protobuf's limit). ``convert``: {tensor name: (dtype its bytes hold now,
    function giving the values to write)}, for tensors a pass retyped without touching their data. ``consume``
    removes each source file under ``base`` once it is copied (scratch files of the tracer, one per tensor)."""
    convert = convert or {}
    data = path.parent / data_name
    with open(data, "wb") if external else contextlib.nullcontext() as f:  # embedded: no data file
        for t in model.graph.initializer:
            source = Path(base) / info(t)["location"] if is_external(t) else None
            if not (t.name in convert or source is not None or (external and t.ByteSize() >= EMBED_BELOW)):
                continue  # a small embedded tensor stays as it is
            held, fix = convert.get(t.name, (None, None))
            a = read(t, base, held)
            if fix is not None:
                a = fix(a)
            a = np.ascontiguousarray(a)
            if external and a.nbytes >= EMBED_BELOW:
                if a.nbytes >= ALIGN_FROM:
                    f.seek(-f.tell() % ALIGN, os.SEEK_CUR)
                offset = f.tell()
                a.tofile(f)
                _point(t, data_name, offset, a.nbytes)
            else:
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
                t.raw_data = a.tobytes()
            del a
            if consume and source is not None:
                source.unlink(missing_ok=True)
    onnx.save_model(model, str(path))
