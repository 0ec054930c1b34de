"""Shared fixtures: small random-weight checkpoints of each family, built here from configs, and
their exported model directories (built once per test session)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HAVE_EXPORT = all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers", "onnx"))
SMALL_FAMILIES = ("sd1", "sd2", "sdxl")


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
