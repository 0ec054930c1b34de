"""Writing generated images: PNG with the generation parameters in a text chunk, atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text[PARAMETERS_KEY])
