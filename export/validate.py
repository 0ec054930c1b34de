"""Run an exported graph in ONNX Runtime (CPU) against its PyTorch module on random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdrt.runtime.errors import SdrtError

from .components import Component

FP32_MAX_REL = 1e-3
# fp16 graphs against the fp32 PyTorch module: half precision's ~1e-3 per op, accumulated over a UNet.
FP16_MAX_REL = 5e-2


class ValidationError(SdrtError, RuntimeError):
    pass


# a component with more weights than this is validated at its cheapest shape alone (time and memory)
LARGE_BYTES = 2 << 30


def validation_shapes(comp: Component) -> list[tuple[int, int, int]]:
    """The shapes ``comp`` is validated at: all of its validation shapes, or for a large module (a real-size
    UNet or OpenCLIP bigG text encoder) the cheapest alone."""
    size = sum(p.numel() * p.element_size() for p in comp.module.parameters())
    if size <= LARGE_BYTES:
        return list(comp.validation_shapes)
    return [min(comp.validation_shapes, key=lambda s: (s[0] * s[1] * s[2], s[0]))]


def reference(comp: Component, seed: int = 0) -> list[tuple[tuple, tuple]]:
    """(inputs, outputs) of the PyTorch module, as numpy arrays, at each validation shape: computed before the
    export, so that the module can be freed before ONNX Runtime loads the graph (compare)."""
    refs = []
    for i, shape in enumerate(validation_shapes(comp)):
        torch.manual_seed(seed + i)
        inputs = comp.sample(*shape)
        with torch.no_grad():
            out = comp.module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        refs.append((tuple(t.numpy().astype(s.dtype) for s, t in zip(comp.inputs, inputs)),
                     tuple(o.float().numpy() for o in out)))
        del out
    return refs


def compare(comp: Component, onnx_path: Path, refs: list[tuple[tuple, tuple]]) -> dict:
    """Max absolute and relative (to the reference's max magnitude) error of the graph in ONNX Runtime (CPU)
    against ``reference``'s outputs, every output, every shape."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The graph as exported: ONNX Runtime's own optimizations are the runtime's (the parity tests cover them),
    # and they cost here: minutes of session creation on a real-size UNet, and on an fp16 graph (which the CPU
    # provider runs through fp32 casts) fp32 copies of every weight folded beside the fp16 ones.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False  # each activation's memory back as it is freed
    # In the default order every Cast of an fp16 weight, having no input to wait for, runs first: the fp32 copy
    # of every weight alive at once (SD 1.5's fp16 UNet: 4.6 GiB). In priority order each runs before its use.
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    worst_abs, worst_rel, shapes = 0.0, 0.0, []
    for inputs, ref in refs:
        feed = {spec.name: a for spec, a in zip(comp.inputs, inputs)}
        got = sess.run([o.name for o in comp.all_outputs], feed)
        shape = {spec.name: list(a.shape) for spec, a in zip(comp.inputs, inputs)}
        for spec, r, g in zip(comp.all_outputs, ref, got):
            if g.shape != r.shape:
                raise ValidationError(f"{comp.name}: output {spec.name} has shape {g.shape} in ONNX Runtime, {r.shape} in PyTorch")
            if not np.isfinite(g).all():
                raise ValidationError(f"{comp.name}: output {spec.name} has NaN or Inf in ONNX Runtime at shape {shape}")
            err = float(np.abs(g.astype(np.float64) - r).max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(float(np.abs(r).max()), 1e-12))
        shapes.append(shape)
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "shapes": shapes}
