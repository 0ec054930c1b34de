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


def validate(comp: Component, onnx_path: Path, seed: int = 0) -> dict:
    """Max absolute and relative (to the reference's max magnitude) error over the component's
    validation shapes, every output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    worst_abs, worst_rel, shapes = 0.0, 0.0, []
    for i, shape in enumerate(comp.validation_shapes):
        torch.manual_seed(seed + i)
        inputs = comp.sample(*shape)
        with torch.no_grad():
            ref = comp.module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        feed = {spec.name: t.numpy().astype(spec.dtype) for spec, t in zip(comp.inputs, inputs)}
        got = sess.run([o.name for o in comp.all_outputs], feed)
        for spec, r, g in zip(comp.all_outputs, ref, got):
            r = r.float().numpy()
            if g.shape != r.shape:
                raise ValidationError(f"{comp.name}: output {spec.name} has shape {g.shape} in ONNX Runtime, {r.shape} in PyTorch")
            if not np.isfinite(g).all():
                raise ValidationError(f"{comp.name}: output {spec.name} has NaN or Inf in ONNX Runtime at shape {shape}")
            err = float(np.abs(g.astype(np.float64) - r).max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(float(np.abs(r).max()), 1e-12))
        shapes.append({spec.name: list(t.shape) for spec, t in zip(comp.inputs, inputs)})
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "shapes": shapes}
