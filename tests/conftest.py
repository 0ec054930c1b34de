"""Shared fixtures: small random-weight checkpoints of each family, built here from configs, and
their exported model directories (built once per test session)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HAVE_EXPORT = all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers", "onnx"))
SMALL_FAMILIES = ("sd1", "sd2", "sdxl")
# The same with an inpainting UNet (9 input channels) under diffusers' inpainting pipeline classes.
INPAINT_FAMILIES = ("sd1-inpaint", "sd2-inpaint", "sdxl-inpaint")


def _session_cache(tmp_path_factory, kind: str, family: str, make) -> Path:
    path = tmp_path_factory.getbasetemp() / kind / family
    if not (path / ".done").exists():
        make(path)
        (path / ".done").touch()
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> path of a random-weight diffusers checkpoint (seed 0)."""
    if not HAVE_EXPORT:
        pytest.skip("needs the [export] extra (torch, diffusers, transformers, onnx)")
    from sdrt.export.testing import build_checkpoint

    return lambda family: _session_cache(tmp_path_factory, "ckpt", family, lambda p: build_checkpoint(family, p, seed=0))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, checkpoint):
    """model_dir(family) -> path of the sdrt model directory exported from checkpoint(family)."""
    from sdrt.export.exporter import export_model

    def make(family):
        def build(p):
            export_model(checkpoint(family), p, overwrite=True, log=lambda *_: None)

        return _session_cache(tmp_path_factory, "model", family, build)

    return make


_BLOCK_HEAVY_IMPORTS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture
def run_torch_free():
    """``run(code, cwd)``: run Python ``code`` in a fresh interpreter where torch, diffusers and
    transformers cannot be imported; returns the CompletedProcess (text output captured)."""

    def run(code: str, cwd) -> subprocess.CompletedProcess:
        script = _BLOCK_HEAVY_IMPORTS + textwrap.dedent(code)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)

    return run
