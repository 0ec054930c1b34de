"""Reduced precisions: `sdrt quantize` writes an int8 UNet into the model directory and records it; int8 and
bf16 images stay close to fp32's (PSNR, not the 2e-3 parity tolerance: reduced precision is measured, not
held to it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.precision import isa

CALL = dict(num_inference_steps=6, seed=3, output_type="np", height=64, width=64)
PROMPT = "a blue square on a yellow background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def fp32(model_dir):
    return Pipeline.load(model_dir("sd1"), backend="ort-cpu")(PROMPT, **CALL).images


def _quantized(model_dir, tmp_path, method):
    pytest.importorskip("onnx")
    from sdrt.export.quantize import quantize_model

    root = tmp_path / "sd1"
    shutil.copytree(model_dir("sd1"), root, ignore=shutil.ignore_patterns("cache"))
    variant = quantize_model(root, method=method, num_prompts=3, steps=4, height=64, width=64, log=lambda *_: None)
    return root, variant


def test_ort_static_quantize_records_the_int8_unet_and_both_cpu_backends_run_it(model_dir, tmp_path, fp32):
    root, variant = _quantized(model_dir, tmp_path, "ort-static")
    rec = json.loads((root / "sdrt.json").read_text())["components"]["unet"]["variants"]["int8"]
    assert rec == variant and rec["method"] == "ort-static" and rec["format"] == "onnx"
    assert (root / rec["file"]).is_file() and rec["calibration"]["samples"] >= 3 * 4
    assert not [p for p in (root / "unet").iterdir() if p.name.startswith(".")]  # no temporary left behind
    backends = ["ort-cpu"] + (["openvino"] if _have_openvino() else [])
    for backend in backends:
        out = Pipeline.load(root, backend=backend, precision="int8")(PROMPT, **CALL)
        assert out.parameters["precision"] == "int8"
        assert psnr(out.images, fp32) > 22, backend


def test_lora_on_the_int8_unet_is_refused(model_dir, tmp_path):
    root, _ = _quantized(model_dir, tmp_path, "ort-static")
    pipe = Pipeline.load(root, backend="ort-cpu", precision="int8")
    with pytest.raises(Exception, match="LoRA cannot be applied to the int8 unet"):
        pipe.engines["unet"].set_weights({"x": np.zeros(1)})


@pytest.mark.slow
def test_nncf_hybrid_quantize_runs_on_openvino_and_ort_says_it_cannot(model_dir, tmp_path, fp32):
    pytest.importorskip("nncf")
    from sdrt.runtime.errors import ModelDirError

    root, variant = _quantized(model_dir, tmp_path, "nncf")
    assert variant["format"] == "openvino" and variant["file"].endswith(".xml")
    out = Pipeline.load(root, backend="openvino", precision="int8")(PROMPT, **CALL)
    assert psnr(out.images, fp32) > 25
    with pytest.raises(ModelDirError, match="OpenVINO IR.*--backend openvino"):
        Pipeline.load(root, backend="ort-cpu", precision="int8")
    assert Pipeline.load(root, precision="int8").backend == "openvino"  # auto: the backend that runs it


def test_auto_runs_each_reduced_precision_on_the_cpu_backend_measured_faster(monkeypatch):
    """Without OpenVINO installed too: the choice reads the CPU's flags and the manifest only."""
    from sdrt.runtime.backends import auto_cpu_backend, openvino as ov_backend

    qdq = {"components": {"unet": {"variants": {"int8": {"format": "onnx", "method": "ort-static"}}}}}
    ir = {"components": {"unet": {"variants": {"int8": {"format": "openvino", "method": "nncf"}}}}}
    avx2, vnni = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}
    monkeypatch.setattr(ov_backend, "openvino_available", lambda: True)
    assert auto_cpu_backend("bf16", qdq, vnni) == "openvino"
    assert auto_cpu_backend("int8", qdq, avx2) == "ort-cpu"  # no VNNI: ONNX Runtime's int8 kernels are the faster
    assert auto_cpu_backend("int8", qdq, vnni) == "openvino"
    assert auto_cpu_backend("int8", ir, avx2) == "openvino"  # only OpenVINO runs an IR
    monkeypatch.setattr(ov_backend, "openvino_available", lambda: False)
    assert auto_cpu_backend("int8", qdq, vnni) == "ort-cpu"
    assert auto_cpu_backend("int8", ir, avx2) == "openvino"  # and says to install it


def test_quantize_auto_writes_the_int8_graph_that_runs_best_on_this_cpu():
    """`sdrt quantize`'s default follows `auto`'s backend: NNCF on a CPU with VNNI (OpenVINO runs its int8 the
    fastest there, and it is the closer to fp32), ONNX Runtime's QDQ elsewhere or without NNCF."""
    from sdrt.export.quantize import resolve_method

    avx2, vnni = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}
    assert resolve_method("auto", vnni, nncf_available=True)[0] == "nncf"
    assert resolve_method("auto", avx2, nncf_available=True)[0] == "ort-static"
    method, why = resolve_method("auto", vnni, nncf_available=False)
    assert method == "ort-static" and "pip install 'sdrt[openvino]'" in why
    assert resolve_method("ort-static", vnni, nncf_available=True)[0] == "ort-static"  # asked for: as asked
    assert resolve_method("nncf", avx2, nncf_available=False)[0] == "nncf"  # (and says what to install when it runs)


def test_bf16_on_openvino_is_close_to_fp32(model_dir, fp32):
    if not _have_openvino():
        pytest.skip("needs OpenVINO (pip install 'sdrt[openvino]')")
    if not isa()["bf16"]:
        pytest.skip("this CPU has no AVX-512 BF16 or AMX")
    pipe = Pipeline.load(model_dir("sd1"), backend="openvino", precision="bf16")
    out = pipe(PROMPT, **CALL)
    assert psnr(out.images, fp32) > 35
    # the text encoder's conditioning steers every step: it stays f32; the UNet and the VAE run bf16
    hints = {name: pipe.engine(name).config["INFERENCE_PRECISION_HINT"]
             for name in ("text_encoder", "unet", "vae_decoder")}
    assert hints == {"text_encoder": "f32", "unet": "bf16", "vae_decoder": "bf16"}


def _have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def test_bench_measures_reduced_precisions_by_psnr_not_the_parity_tolerance():
    from sdrt.benchmarks.bench import _compare_images, parse_contenders

    assert {"sdrt-openvino", "sdrt-openvino-bf16", "sdrt-ort-cpu-int8", "optimum-intel"} <= set(parse_contenders(None, False))
    ref = np.full((1, 8, 8, 3), 0.5, np.float32)
    cs = {name: {"status": "ok", "precision": p, "image_array": ref + d}
          for name, p, d in (("diffusers", "fp32", 0.0), ("sdrt-openvino", "fp32", 1e-5), ("sdrt-openvino-bf16", "bf16", 0.01),
                             ("optimum-intel", "bf16", 0.1))}
    _compare_images(cs, 2e-3)
    assert cs["sdrt-openvino"]["image_matches"] is True and cs["sdrt-openvino"]["image_psnr_db"] > 90
    bf16 = cs["sdrt-openvino-bf16"]
    assert bf16["image_matches"] is None and abs(bf16["image_psnr_db"] - 40.0) < 0.01 and "PSNR 40.0 dB" in bf16["image_note"]
    assert "pipeline" not in bf16["image_note"] and "its own export" in cs["optimum-intel"]["image_note"]


def test_ort_static_quantize_refuses_hard_linked_external_data_before_calibrating(model_dir, tmp_path):
    pytest.importorskip("onnx")
    import os

    from sdrt.export.quantize import QuantizeError, quantize_model

    root = tmp_path / "sd1"
    shutil.copytree(model_dir("sd1"), root, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((root / "sdrt.json").read_text())
    data = root / "unet" / "model.onnx_data"  # as a model over 2 GB has it, linked in from a `cp -al` copy
    data.write_bytes(b"\0" * 16)
    os.link(data, tmp_path / "other-copy")
    manifest["components"]["unet"]["external_data"] = "unet/model.onnx_data"
    (root / "sdrt.json").write_text(json.dumps(manifest))
    calls = []
    with pytest.raises(QuantizeError, match=r"2 hard links.*cp -r.*--method nncf"):
        quantize_model(root, method="ort-static", num_prompts=1, steps=1, height=64, width=64, log=calls.append)
    assert calls == []  # said before any calibration run
