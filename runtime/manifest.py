"""The model directory's manifest, ``sdrt.json``: the contract between export and runtime (DESIGN.md).

Export writes it, the runtime and the engine builder read it. Shapes are lists whose entries are
ints (fixed) or strings (named dynamic dimensions, e.g. ``"batch"``, ``"latent_height"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

MANIFEST_NAME = "sdrt.json"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl")


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or written by a newer sdrt."""


def load_manifest(model_dir: str | os.PathLike) -> dict:
    """Read and check ``sdrt.json`` of ``model_dir``."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist; create one with `sdrt export CHECKPOINT --out {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(f"{path} is missing: {root} is not an sdrt model directory (make one with `sdrt export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path} cannot be read ({e}); re-export the model with `sdrt export --overwrite`") from e
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ModelDirError(f"{path} has no integer format_version; re-export the model with `sdrt export --overwrite`")
    if version > FORMAT_VERSION:
        raise ModelDirError(
            f"{path} has format version {version}, newer than this sdrt understands ({FORMAT_VERSION}); "
            f"upgrade sdrt (it was written by sdrt {manifest.get('sdrt_version', '?')})"
        )
    return manifest


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open()``/``mkdir()`` would give under this umask: mkstemp and
    mkdtemp make private files, and a model directory is meant to be read by others."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync and a rename: readers see
    the old file or the new one, never part of one, and a failure leaves the old one in place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
