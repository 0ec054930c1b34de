"""The one interface between the runtime and an inference engine: named numpy arrays in, named
numpy arrays out. ONNX Runtime (CPU, CUDA) and TensorRT implement it."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable  # noqa: F401  (re-exported)


class Engine(Protocol):
    """One component (text encoder, UNet, VAE decoder, ...) ready to run."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

