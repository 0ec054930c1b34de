"""sdrt: Stable Diffusion export to ONNX / TensorRT and a torch-free runtime.

``from sdrt import Pipeline`` is the front door; it is imported on first use, so ``import sdrt``
stays light (no ONNX Runtime)."""

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
