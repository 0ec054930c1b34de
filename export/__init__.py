"""Torch side: load a diffusers checkpoint, export ONNX, optimize, validate."""
