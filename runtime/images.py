"""Writing generated images: PNG with the generation parameters in a text chunk, atomically."""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_atomic

PARAMETERS_KEY = "parameters"


def output_paths(out: str | Path, n: int) -> list[Path]:
    """One image: ``out`` itself; several: ``stem-0.png``, ``stem-1.png``, ..."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(out.suffix + ".png") if out.suffix else out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def save_png(image, path: str | Path, parameters: dict) -> Path:
    """Save a PIL image as PNG with ``parameters`` (JSON) in a tEXt chunk; a failure leaves no partial file."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, default=str))
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
    return path


def read_parameters(path: str | Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text[PARAMETERS_KEY])
