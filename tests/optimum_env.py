"""A virtual environment of its own for optimum-onnx, made once and cached.

optimum-onnx 0.1.0 pins transformers < 4.58 while sdrt's export side runs transformers 5, so optimum
cannot be imported beside sdrt: the interop tests run it in this environment, through small
scripts, and compare images through .npy files.

    python tests/optimum_env.py            # make (or find) it; prints its python

The environment lives under $SDRT_TEST_CACHE (default ~/.cache/sdrt-test)/optimum-venv-<key>, the key
being a hash of the pinned versions below: changing a pin makes a new one. A half-made environment
(pip failed, no network) is never used: the marker file is written last.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

# torch first, from local disk (a CPU build), so that optimum's dependencies do not pull a CUDA one
TORCH = "torch==2.13.0"
PINS = ("optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.6", "diffusers==0.35.2", "onnx", "pillow")
DONE = ".sdrt-ready"


def cache_root() -> Path:
    return Path(os.environ.get("SDRT_TEST_CACHE", Path.home() / ".cache" / "sdrt-test"))


def env_dir() -> Path:
    key = hashlib.sha256(" ".join((sys.version.split()[0], TORCH) + PINS).encode()).hexdigest()[:12]
    return cache_root() / f"optimum-venv-{key}"


def python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure(log=print) -> Path:
    """The environment's python, making the environment first if needed; RuntimeError (with pip's last
    lines) when it cannot be made."""
    path = env_dir()
    if (path / DONE).is_file():
        return python(path)
    log(f"making the optimum-onnx environment in {path} (once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    py = str(python(path))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for args in ([TORCH], list(PINS)):
        r = subprocess.run([py, "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"pip install {' '.join(args)} failed in {path}: {tail}")
    (path / DONE).write_text(" ".join((TORCH,) + PINS) + "\n")
    return python(path)


if __name__ == "__main__":
    print(ensure(log=lambda m: print(m, file=sys.stderr)))
