"""The one interface between the runtime and an inference engine: named numpy arrays in, named
numpy arrays out. ONNX Runtime (CPU, CUDA) and TensorRT implement it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable  # noqa: F401  (re-exported)


class Engine(Protocol):
    """One component (text encoder, UNet, VAE decoder, ...) ready to run."""

    name: str
    input_names: list[str]
    output_names: list[str]
    # where the engine keeps a cache of its own (ONNX Runtime's optimized graphs, OpenVINO's compiled models):
    # "hit" (what runs came from it), "filled" (made now and written to it), "none" (not cacheable), "" (not
    # made yet); an engine without one need not have the attribute
    cache_state: str

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


# backend -> the tag in the names of its cache entries (``<component>-<tag>-<key>`` under the cache root):
# what a reader of the cache (the benchmark warming one backend's files) tells them apart by
CACHE_TAGS = {"ort-cpu": "cpu", "ort-cuda": "cuda", "openvino": "openvino"}


def cache_entry(root: Path, component: str, backend: str, key: str) -> Path:
    return root / f"{component}-{CACHE_TAGS[backend]}-{key}"


def is_cache_entry_of(name: str, backend: str) -> bool:
    tag = CACHE_TAGS.get(backend)
    return tag is not None and f"-{tag}-" in name
