"""``sdrt quantize DIR``: an int8 UNet written into the model directory beside the fp32 one, calibrated on
UNet inputs captured from real denoising runs of the model itself, and recorded in the manifest as
``components.unet.variants.int8`` (``Pipeline.load(DIR, precision="int8")`` then runs it).

Methods:

- ``auto`` (default): ``nncf`` on a CPU with VNNI where NNCF is installed, else ``ort-static`` (``resolve_method``).
- ``ort-static``: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``):
  QDQ, activations uint8 (asymmetric, MinMax over the calibration set), weights int8 per channel; Conv, Gemm
  and the MatMuls with a weight (attention's activation-by-activation MatMuls stay float, ``MatMulConstBOnly``).
  An ONNX graph: ONNX Runtime (``ort-cpu``) and OpenVINO both run it with int8 kernels.
- ``nncf``: OpenVINO NNCF in optimum-intel's hybrid mode for diffusion UNets
  (``optimum.intel.openvino.quantization._hybrid_quantization``): the weights of MatMuls int8 (weight only),
  every other op with weights (the convolutions) quantized in full, activations calibrated, SmoothQuant off.
  An OpenVINO IR (``model.int8.xml`` + ``.bin``): the ``openvino`` backend only.

Needs onnx and onnxruntime's quantization tools (``ort-static``: the [export] extra) or nncf (``nncf``: the
[openvino] extra); never torch. The write is atomic: files are made in a temporary folder inside the UNet's,
renamed into place, then the manifest is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

METHODS = ("auto", "ort-static", "nncf")
COMPONENT = "unet"
# Calibration prompts: varied subjects, styles and compositions, as a user's prompts would be (the built-in
# default model reads its own words in them and tokenizes the rest).
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red circle on a blue background",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a small green triangle above a large yellow square",
    "portrait of an old fisherman, dramatic lighting, highly detailed",
    "a busy city street at night in the rain, neon signs",
    "a bowl of fruit on a wooden table, still life, oil on canvas",
    "a purple star on the left and an orange cross on the right",
)


class QuantizeError(SdrtError, RuntimeError):
    """``sdrt quantize`` cannot run as asked; the message says why and what to do."""


def resolve_method(method: str, flags: set[str] | None = None, nncf_available: bool | None = None) -> tuple[str, str]:
    """(the method to run, why): ``auto`` picks the one `--precision int8` then runs best on this machine, as
    ``auto_cpu_backend`` picks its backend. On a CPU with VNNI, ``nncf`` (OpenVINO runs int8 fastest there, and
    NNCF's hybrid mode keeps the image closer to fp32); elsewhere, or without NNCF, ``ort-static``, which both
    CPU backends run (ONNX Runtime, the faster one on AVX2)."""
    if method != "auto":
        return method, "as asked"
    from sdrt.runtime.precision import isa

    if not isa(flags)["vnni"]:
        return "ort-static", "this CPU has no VNNI, where ONNX Runtime runs int8 fastest"
    if nncf_available is None:
        import importlib.util

        nncf_available = all(importlib.util.find_spec(m) is not None for m in ("nncf", "openvino"))
    if not nncf_available:
        return "ort-static", ("NNCF is not installed (`pip install 'sdrt[openvino]'` for --method nncf, faster and "
                              "closer to fp32 on this CPU)")
    return "nncf", ("this CPU has VNNI, where OpenVINO runs NNCF's int8 fastest and closest to fp32; "
                    "--method ort-static for an int8 graph ONNX Runtime runs too")


class _Recorder:
    """Wraps the UNet engine: every call's inputs are kept (copied) as one calibration sample."""

    def __init__(self, engine):
        self.engine, self.samples = engine, []
        self.name = engine.name

    def __getattr__(self, item):
        return getattr(self.engine, item)

    def __call__(self, **inputs):
        self.samples.append({k: np.array(v) for k, v in inputs.items()})
        return self.engine(**inputs)


def calibration_samples(model_dir: Path, prompts, steps: int, height: int | None, width: int | None,
                        guidance: float | None, seed: int, log=print) -> list[dict]:
    """The UNet's inputs at every step of a real denoising run (ONNX Runtime, fp32) per prompt."""
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(model_dir, backend="ort-cpu")
    recorder = _Recorder(pipe.engines[COMPONENT])
    pipe.engines[COMPONENT] = recorder
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, seed=seed + i,
             output_type="latent")
        log(f"calibration run {i + 1}/{len(prompts)}: {prompt!r} ({time.perf_counter() - t0:.1f}s)")
    pipe.close()
    return recorder.samples


def _quantize_ort(src: Path, out: Path, samples: list[dict], large: bool) -> None:
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError as e:
        raise QuantizeError(f"--method ort-static needs onnx and onnxruntime's quantization tools ({e}); "
                            "pip install 'sdrt[export]'") from e

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
        # MatMulConstBOnly: attention's QK^T and attn·V stay float. (MinMax calibration keeps only each tensor's
        # reduced min and max per sample, so its memory is small; ORT 1.32's CalibMaxIntermediateOutputs drops
        # the ranges it has gathered when it flushes, so it is not used.)
        extra_options={"MatMulConstBOnly": True},
    )


def _weighted_matmuls(model) -> list[str]:
    """Names of the MatMuls that take a weight (a Constant, possibly through a Convert)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(2):
            node = op.input_value(port).get_node()
            if node.get_type_name() == "Convert":
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def _quantize_nncf(src: Path, out: Path, samples: list[dict]) -> None:
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise QuantizeError(f"--method nncf needs nncf and OpenVINO ({e}); pip install 'sdrt[openvino]'") from e
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its per-node tables of what it ignored
    model = ov.Core().read_model(str(src))
    matmuls = _weighted_matmuls(model)
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
    model = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                          model_type=nncf.ModelType.TRANSFORMER,
                          ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                          advanced_parameters=nncf.AdvancedQuantizationParameters(
                              smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)))
    ov.save_model(model, str(out), compress_to_fp16=False)


def _check_onnx_can_read(model_dir: Path, rec: dict) -> None:
    """onnx (1.23), which ort-static loads the graph with, refuses external data with more than one hard link
    (its guard against hard-link attacks) — a model directory copied with ``cp -al`` — and would say so only
    after the calibration runs: said here, before them."""
    data = rec.get("external_data")
    path = model_dir / data if data else None
    if path is not None and path.is_file() and path.stat().st_nlink > 1:
        raise QuantizeError(f"{path} has {path.stat().st_nlink} hard links, and onnx refuses to read external "
                            "data through a hard-linked file; quantize a real copy of the model directory "
                            "(`cp -r`, not `cp -al`), or use --method nncf")


def quantize_model(model_dir: str | os.PathLike, method: str = "auto", prompts=None, num_prompts: int | None = None,
                   steps: int = 10, height: int | None = None, width: int | None = None, guidance: float | None = None,
                   seed: int = 0, log=print) -> dict:
    """Write the int8 UNet of ``model_dir`` and record it in sdrt.json; returns the variant's record."""
    from sdrt import __version__
    from sdrt.runtime.files import default_mode, sha256_file, write_json_atomic
    from sdrt.runtime.manifest import load_manifest
    from sdrt.runtime.precision import is_inside

    model_dir = Path(model_dir)
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        method, why = resolve_method(method)
        log(f"method: {method} ({why})")
    manifest = load_manifest(model_dir)
    rec = manifest["components"].get(COMPONENT)
    if rec is None:
        raise QuantizeError(f"{model_dir} has no {COMPONENT}")
    if rec.get("precision", "fp32") != "fp32":
        raise QuantizeError(f"{model_dir}'s {COMPONENT} is {rec['precision']}; quantize an fp32 export "
                            "(`sdrt export` without --fp16)")
    prompts = list(prompts or PROMPTS)[: num_prompts or None]
    if not prompts or steps < 1:
        raise QuantizeError("calibration needs at least one prompt and one step")
    if method == "ort-static":
        _check_onnx_can_read(model_dir, rec)
    samples = calibration_samples(model_dir, prompts, steps, height, width, guidance, seed, log)
    log(f"calibrating {method} on {len(samples)} UNet calls ({len(prompts)} prompts x {steps} steps)")

    src = model_dir / rec["file"]
    unet_dir = src.parent
    stem = "model.int8"
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=unet_dir))
    try:
        t0 = time.perf_counter()
        if method == "ort-static":
            large = bool(rec.get("external_data")) or src.stat().st_size > 1 << 30
            _quantize_ort(src, tmp / f"{stem}.onnx", samples, large)
            main_name, fmt = f"{stem}.onnx", "onnx"
        else:
            _quantize_nncf(src, tmp / f"{stem}.xml", samples)
            main_name, fmt = f"{stem}.xml", "openvino"
        log(f"quantized in {time.perf_counter() - t0:.1f}s")
        made = sorted(p.name for p in tmp.iterdir() if p.is_file())
        data = [n for n in made if n != main_name]
        if len(data) > 1:
            raise QuantizeError(f"the quantizer wrote more files than expected: {', '.join(made)}")
        rel = lambda name: (unet_dir / name).relative_to(model_dir).as_posix()  # noqa: E731
        variant = {
            "file": rel(main_name), "external_data": rel(data[0]) if data else None, "format": fmt,
            "precision": "int8", "method": method,
            "sha256": sha256_file(tmp / main_name),
            "external_data_sha256": sha256_file(tmp / data[0]) if data else None,
            "size_bytes": sum((tmp / n).stat().st_size for n in made),
            "source_sha256": rec.get("sha256"),
            "calibration": {"prompts": len(prompts), "steps": steps, "samples": len(samples), "seed": seed,
                            "height": height or manifest["native_resolution"],
                            "width": width or manifest["native_resolution"], "guidance_scale": guidance},
            "sdrt_version": __version__,
        }
        old = (rec.get("variants") or {}).get("int8") or {}
        for name in made:  # readable as the rest of the model directory (the quantizer writes some files private)
            os.chmod(tmp / name, default_mode())
            os.replace(tmp / name, unet_dir / name)
        manifest = load_manifest(model_dir)  # as it is now: only our key changes
        manifest["components"][COMPONENT].setdefault("variants", {})["int8"] = variant
        write_json_atomic(model_dir / "sdrt.json", manifest)
        for key in ("file", "external_data"):  # a previous variant's files that the new one does not reuse
            prev = old.get(key)
            if is_inside(prev) and prev not in (variant["file"], variant["external_data"]):
                (model_dir / prev).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return variant
