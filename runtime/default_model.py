"""Where the built-in default model lives (package data), when it is installed."""

from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST_NAME


def default_model_dir() -> Path | None:
    path = Path(__file__).parent / "default_model"
    return path if (path / MANIFEST_NAME).is_file() else None
