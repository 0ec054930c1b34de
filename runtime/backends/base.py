"""The one interface between the runtime and an inference engine: named numpy arrays in, named
numpy arrays out. ONNX Runtime (CPU, CUDA) and TensorRT implement it."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    """One component (text encoder, UNet, VAE decoder, ...) ready to run."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package or device missing); the message says what to install."""
