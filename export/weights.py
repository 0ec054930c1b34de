"""The weight map: which initializer of an exported graph holds which Linear/Conv2d weight of the
diffusers (or transformers) model, so that the runtime can add LoRA deltas to the exported graph
without re-exporting it (sdrt.runtime.lora).

The tracer names most weights after their parameters, but not all: a Linear feeding a MatMul is
written transposed under a generated name (``onnx::MatMul_1636``), and constant folding renames
more. So the map is made by value: each module's weight (or its transpose) is found among the
graph's initializers by a fingerprint of its values and then compared in full.

The map is written beside the graph as ``weights.json``; each entry also records where the
initializer's bytes lie in the graph's external data file, so the runtime reads the base weight
with a memory map (no onnx package at run time). Graphs with a map are therefore always saved with
external data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from . import external

WEIGHTS_NAME = "weights.json"
# the components whose weights LoRA files address (diffusers' and kohya's prefixes name these), and the UNet
# taking ControlNet residuals (the UNet's own weights under the same module names: the unet's updates apply)
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_controlnet")
_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def lora_targets(wrapper: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """The wrapper's child name and its Linear and Conv2d weights by module name, named as in the
    diffusers/transformers model the export wrapper holds (its one child: ``unet``, ``encoder``), which
    is how LoRA files name them."""
    (prefix, model), = wrapper.named_children()
    return prefix, {name: m.weight.detach() for name, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _scope(prefix: str, module: str) -> str:
    """The tracer's node-name scope of a module: ``encoder.layers.2.mlp.fc1`` under ``encoder`` is
    ``/encoder/encoder/layers.2/mlp/fc1/``."""
    parts: list[str] = []
    for p in module.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/" + "/".join([prefix, *parts]) + "/"


def _fingerprint(a: np.ndarray) -> tuple:
    flat = a.reshape(-1)
    return a.shape, flat[:: max(1, flat.size // 61)][:64].tobytes()


def _raw(t: onnx.TensorProto, base: Path | None) -> np.ndarray | None:
    """The weight's values (mapped when on disk), or None for a tensor that holds no float weight."""
    if t.data_type not in _DTYPES or not (t.raw_data or (base is not None and external.is_external(t))):
        return None
    return external.read(t, base, mmap=True)


def map_weights(wrapper: torch.nn.Module, model: onnx.ModelProto, base: Path | None = None
                ) -> tuple[dict[str, dict], dict[str, list]]:
    """({module name: {"initializer": name, "transposed": bool}} for every Linear/Conv2d weight of the
    traced module found in ``model`` (fp32; weights inside or in external files under ``base``, read one at
    a time), and the modules not found: "unused" ones
    the graph does not compute at all (the last layer of a text encoder whose penultimate states are
    the output), whose LoRA updates cannot change the output; "unmapped" ones it computes without
    holding their weight as one initializer, whose LoRA updates the runtime refuses."""
    inits = model.graph.initializer
    by_print: dict[tuple, list[int]] = {}  # indices only: protobuf hands out a copy of raw_data on each read
    for i, t in enumerate(inits):
        if len(t.dims) not in (2, 4):
            continue
        a = _raw(t, base)
        if a is not None:
            by_print.setdefault(_fingerprint(a), []).append(i)
        del a
    found = {}
    prefix, targets = lora_targets(wrapper)
    for name, w in targets.items():
        w = w.float().numpy()
        for transposed, cand in ((False, w), (True, np.ascontiguousarray(w.T) if w.ndim == 2 else None)):
            if cand is None:
                continue
            hit = next((inits[i].name for i in by_print.get(_fingerprint(cand), ()) if np.array_equal(_raw(inits[i], base), cand)),
                       None)
            if hit is not None:
                found[name] = {"initializer": hit, "transposed": transposed}
                break
    scopes = [n.name for n in model.graph.node]
    missing = {"unused": [], "unmapped": []}
    for name in targets:
        if name not in found:
            scope = _scope(prefix, name)
            missing["unmapped" if any(scope in s for s in scopes) else "unused"].append(name)
    return found, missing


def write_weight_map(found: dict[str, dict], missing: dict[str, list], graph: Path) -> Path:
    """Add each initializer's external-data location, shape and dtype (read from the saved ``graph``)
    to the map and write it as weights.json beside the graph."""
    model = onnx.load(str(graph), load_external_data=False)
    wanted = {e["initializer"] for e in found.values()}
    where = {}
    for t in model.graph.initializer:
        if t.name in wanted and t.data_location == onnx.TensorProto.EXTERNAL and t.data_type in _DTYPES:
            info = {e.key: e.value for e in t.external_data}
            where[t.name] = {"offset": int(info.get("offset", 0)), "length": int(info["length"]),
                             "dtype": np.dtype(_DTYPES[t.data_type]).name, "shape": list(t.dims),
                             "file": info["location"]}
    entries = {name: {**e, **where[e["initializer"]]} for name, e in found.items() if e["initializer"] in where}
    path = graph.parent / WEIGHTS_NAME
    path.write_text(json.dumps({"format": 1, "weights": entries, **missing}, indent=1, sort_keys=True) + "\n")
    return path
