"""The built-in default model: an sdrt model directory shipped as package data
(``sdrt/runtime/assets/default-model``), trained by ``python -m sdrt.export.default_model.train``."""

from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST_NAME

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"


def default_model_dir() -> Path | None:
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / MANIFEST_NAME).is_file() else None
