"""Atomic file writes and hashing, shared by export, build and the runtime's image output; and handing
freed heap back to the OS after multi-GB weights were read or written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


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


def release_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps freed multi-MB buffers (protobuf copies of a graph,
    LoRA-merged weights) in its arenas, so the next stage would otherwise grow the process by them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def replace_dir(new: Path, target: Path) -> None:
    """Move the folder ``new`` to ``target``: an existing target is moved aside first and removed only after, so a
    failure leaves it in place (model directories: export, import)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
