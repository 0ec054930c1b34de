"""The ``optimum-intel`` contender: optimum-intel's ``OVStableDiffusionPipeline`` at its defaults, the engine a
CPU user would pick instead of sdrt.

optimum-intel pins its own transformers (5.5 against this project's 5.x newer), so it runs in its own virtual
environment, built once under ``$XDG_CACHE_HOME/sdrt-bench/optimum-intel-venv`` (``~/.cache``): CPU torch
2.13, ``optimum-intel[openvino]`` and diffusers in one resolve. The checkpoint is exported to OpenVINO IR once
(``OVStableDiffusionPipeline.from_pretrained(..., export=True)``) into the bench cache; the timed worker loads
that IR, as a user's second run would. Nothing of it is imported into this process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .bench import BenchError

# one resolve, torch pinned: pinned, pip picks the CPU build and a torchvision that keeps it (unpinned, optimum-intel's
# torchvision pulls the newest torch, a CUDA build of several GB)
VENV_PACKAGES = ("torch==2.13.0", "optimum-intel[openvino]", "diffusers")
WORKER = Path(__file__).with_name("worker.py")


def venv_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt-bench" / "optimum-intel-venv"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(log) -> Path:
    """The interpreter of optimum-intel's own virtual environment, built on first use (BenchError if it cannot be)."""
    venv = venv_dir()
    done = venv / ".sdrt-complete"  # holds what it was built with: another package list rebuilds it
    want = " ".join(VENV_PACKAGES) + " -torchvision\n"
    if done.is_file() and done.read_text(encoding="utf-8") == want:
        return _python(venv)
    log(f"building optimum-intel's virtual environment in {venv} (once)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", str(venv)]]
    steps.append([str(_python(venv)), "-m", "pip", "install", "-q", *VENV_PACKAGES])
    # PyPI's torchvision is built against CUDA torch: beside the CPU build its ops fail to register, and
    # transformers' AutoProcessor import (optimum-intel's) dies on it; nothing here needs torchvision
    steps.append([str(_python(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision"])
    for cmd in steps:
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            tail = " | ".join(r.stderr.strip().splitlines()[-2:])
            raise BenchError(f"optimum-intel's virtual environment could not be built ({' '.join(cmd[-3:])}: {tail})")
    done.write_text(want, encoding="utf-8")
    return _python(venv)


def prepare(checkpoint: Path, cache: Path, log) -> tuple[str, str]:
    """(interpreter, OpenVINO IR pipeline folder) for the optimum-intel worker; the IR exported on first use."""
    python = ensure_venv(log)
    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    out = (cache / "optimum-intel" / f"{checkpoint.resolve().name}-{key}").absolute()
    if not (out / "model_index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        log(f"exporting {checkpoint} to OpenVINO IR with optimum-intel (once): {out}")
        try:
            r = subprocess.run([str(python), str(WORKER), "--optimum-export", str(checkpoint), str(tmp)],
                               stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            if r.returncode:
                tail = " | ".join(r.stderr.strip().splitlines()[-3:])
                raise BenchError(f"optimum-intel could not export {checkpoint}: {tail}")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(python), str(out)
