"""TensorRT engines: `sdrt build` and the TensorRT backend.

Most of it runs without TensorRT: profiles, range validation, GPU keys, the engine records in
sdrt.json (reuse vs rebuild, atomic writes), the refusal messages and backend selection, all with
a fake "device facts" object and a fake builder. The tests at the end need TensorRT and a GPU and
skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sdrt.export.profiles import MAX_TEXT_CHUNKS, RangeError, component_profile, resolve_ranges, reuse_decision
from sdrt.runtime.engines import (
    DeviceFacts,
    EngineMismatch,
    ShapeOutsideProfile,
    check_engine_set,
    check_shapes,
    gpu_key,
)

H100 = DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")
A100 = DeviceFacts("NVIDIA A100-SXM4-80GB", "8.0", "10.8.0.43")


def _t(name, shape, dtype="float32"):
    return {"name": name, "dtype": dtype, "shape": shape}


def _manifest(native=512) -> dict:
    """An sd1-like manifest (shapes as `sdrt export` writes them)."""
    comps = {
        "text_encoder": ([_t("input_ids", ["batch", 77], "int32"), _t("attention_mask", ["batch", 77], "int32")],
                         [_t("last_hidden_state", ["batch", 77, 768])]),
        "unet": (
            [_t("sample", ["batch", 4, "latent_height", "latent_width"]), _t("timestep", ["batch"]),
             _t("encoder_hidden_states", ["batch", "text_length", 768])],
            [_t("out_sample", ["batch", 4, "latent_height", "latent_width"])],
        ),
        "vae_decoder": ([_t("latent_sample", ["batch", 4, "latent_height", "latent_width"])],
                        [_t("sample", ["batch", 3, "height", "width"])]),
        "vae_encoder": ([_t("sample", ["batch", 3, "height", "width"])],
                        [_t("latent_parameters", ["batch", 8, "latent_height", "latent_width"])]),
    }
    return {
        "format_version": 1,
        "family": "sd1",
        "prediction_type": "epsilon",
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "vae_scaling_factor": 0.18215,
        "scheduler_class": "PNDMScheduler",
        "tokenizers": [{"file": "tokenizer/tokenizer.json", "max_length": 77}],
        "native_resolution": native,
        "components": {
            name: {
                "file": f"{name}/model.onnx",
                "external_data": None,
                "inputs": ins,
                "outputs": outs,
                "precision": "fp32",
                "size_bytes": 1000,
                "sha256": f"{i:x}" * 64,
                "external_data_sha256": None,
            }
            for i, (name, (ins, outs)) in enumerate(comps.items(), 1)
        },
        "engines": {},
    }


@pytest.fixture
def fake_dir(tmp_path):
    """A model directory with an sd1-like manifest and placeholder ONNX files (enough for the builder)."""
    root = tmp_path / "model"
    m = _manifest()
    for name, rec in m["components"].items():
        (root / name).mkdir(parents=True)
        (root / rec["file"]).write_bytes(b"onnx " + name.encode())
    (root / "sdrt.json").write_text(json.dumps(m, indent=2))
    return root


class FakeBuilder:
    """Stands in for TensorRTBuilder: records calls, returns a deterministic 'plan'."""

    def __init__(self, facts=H100, has_fp16_flag=True, fail_on=None):
        self.facts, self.has_fp16_flag, self.fail_on = facts, has_fp16_flag, fail_on
        self.calls = []

    def build(self, onnx_path, profile, plan, *, timing_cache, optimization_level, workspace_gib, refittable=False):
        comp = Path(onnx_path).parent.name
        self.calls.append({"component": comp, "profile": profile, "plan": plan, "timing_cache": timing_cache,
                           "optimization_level": optimization_level, "workspace_gib": workspace_gib,
                           "refittable": refittable})
        if comp == self.fail_on:
            raise RuntimeError(f"boom while building {comp}")
        data = json.dumps({"component": comp, "profile": profile, "precision": plan.precision}).encode()
        return data, (None if timing_cache is None else timing_cache + comp.encode())


def _build(root, builder=None, **kw):
    from sdrt.export.build import build_engines

    builder = builder or FakeBuilder()
    rows = build_engines(root, builder=builder, log=lambda *_: None, **kw)
    return rows, builder


def _load(root) -> dict:
    return json.loads((Path(root) / "sdrt.json").read_text())


# -- GPU key ---------------------------------------------------------------------------------


def test_gpu_key_names_gpu_compute_capability_and_tensorrt_version():
    assert gpu_key(H100) == "nvidia-h100-80gb-hbm3_sm90_trt10.8.0"
    assert H100.key == gpu_key(H100)
    assert gpu_key(DeviceFacts("NVIDIA GeForce RTX 4090", "8.9", "10.3.0")) == "nvidia-geforce-rtx-4090_sm89_trt10.3.0"
    assert gpu_key(DeviceFacts("NVIDIA A100-SXM4-40GB", "8.0", "11.0.0.1")) == "nvidia-a100-sxm4-40gb_sm80_trt11.0.0"


@pytest.mark.parametrize("name", ["../../etc/passwd", "A/B\\C  D", "  ..  ", "Tesla T4 (MIG 1g.5gb)", ""])
def test_gpu_key_is_a_safe_folder_name(name):
    key = gpu_key(DeviceFacts(name, "7.5", "10.8.0"))
    assert "/" not in key and "\\" not in key and ".." not in key and " " not in key
    assert not key.startswith((".", "-")) and key == key.lower()
    assert key.endswith("_sm75_trt10.8.0")


# -- ranges and profiles ---------------------------------------------------------------------


def test_default_ranges_from_native_resolution():
    r = resolve_ranges(_manifest(512))
    assert r.height == (256, 512, 768) and r.width == (256, 512, 768) and r.batch == (1, 1, 1)
    r = resolve_ranges(_manifest(1024), batch=2, max_batch=4)
    assert r.height == (512, 1024, 1536) and r.batch == (1, 2, 4)


def test_default_opt_is_kept_inside_an_explicit_range():
    r = resolve_ranges(_manifest(512), max_height=384, max_width=384)
    assert r.height == (192, 384, 384)  # min from the clamped opt
    r = resolve_ranges(_manifest(512), min_width=640)
    assert r.width == (640, 640, 960)


def test_profiles_unet_batch_doubled_text_length_in_chunks_latent_dims():
    m = _manifest()
    r = resolve_ranges(m, height=512, width=768, min_height=256, max_height=768, min_width=512, max_width=1024,
                       batch=2, max_batch=4)
    unet = component_profile(m, "unet", r)
    assert unet["sample"] == {"min": [1, 4, 32, 64], "opt": [4, 4, 64, 96], "max": [8, 4, 96, 128]}
    assert unet["timestep"] == {"min": [1], "opt": [4], "max": [8]}
    # one 77-token chunk of text at min and opt, MAX_TEXT_CHUNKS of them at max (long prompts)
    assert unet["encoder_hidden_states"] == {"min": [1, 77, 768], "opt": [4, 77, 768], "max": [8, 77 * MAX_TEXT_CHUNKS, 768]}
    te = component_profile(m, "text_encoder", r)
    assert te["input_ids"] == te["attention_mask"] == {"min": [1, 77], "opt": [2, 77], "max": [4, 77]}
    dec = component_profile(m, "vae_decoder", r)
    assert dec["latent_sample"] == {"min": [1, 4, 32, 64], "opt": [2, 4, 64, 96], "max": [4, 4, 96, 128]}
    enc = component_profile(m, "vae_encoder", r)
    assert enc["sample"] == {"min": [1, 3, 256, 512], "opt": [2, 3, 512, 768], "max": [4, 3, 768, 1024]}


def test_profile_of_a_unet_exported_with_a_fixed_text_length():
    """Model directories exported before the UNet took 77·k tokens keep their fixed 77."""
    m = _manifest()
    m["components"]["unet"]["inputs"][2]["shape"] = ["batch", 77, 768]
    unet = component_profile(m, "unet", resolve_ranges(m, batch=1, max_batch=2))
    assert unet["encoder_hidden_states"] == {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [4, 77, 768]}


def test_static_profile_is_one_shape():
    m = _manifest()
    r = resolve_ranges(m, height=640, width=384, batch=2, static=True)
    assert r.height == (640,) * 3 and r.width == (384,) * 3 and r.batch == (2,) * 3
    unet = component_profile(m, "unet", r)
    assert unet["sample"] == {"min": [4, 4, 80, 48], "opt": [4, 4, 80, 48], "max": [4, 4, 80, 48]}
    te = component_profile(m, "text_encoder", r)
    assert te["input_ids"]["min"] == te["input_ids"]["max"] == [2, 77]
    assert unet["encoder_hidden_states"]["min"] == unet["encoder_hidden_states"]["max"] == [4, 77, 768]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"height": 500}, "--height 500 is not a multiple of 8; use 496 or 504"),
        ({"max_width": 1001}, "--max-width 1001 is not a multiple of 8"),
        ({"min_height": 12}, "--min-height 12 is not a multiple of 8"),
        ({"height": 512, "min_height": 640}, "--min-height 640 is larger than --height 512"),
        ({"width": 768, "max_width": 512}, "--width 768 is larger than --max-width 512"),
        ({"height": 0}, "--height must be a positive integer"),
        ({"height": -64}, "--height must be a positive integer"),
        ({"batch": 0}, "--batch must be a positive integer"),
        ({"max_batch": -1}, "--max-batch must be a positive integer"),
        ({"batch": 4, "max_batch": 2}, "--batch 4 is larger than --max-batch 2"),
        ({"static": True, "max_height": 768}, "--static builds one shape"),
        ({"static": True, "batch": 1, "max_batch": 2}, "--static builds one shape"),
    ],
)
def test_range_validation_errors(kw, match):
    with pytest.raises(RangeError, match=match.replace("(", r"\(")):
        resolve_ranges(_manifest(), **kw)


def test_ranges_are_validated_before_anything_is_built(fake_dir):
    builder = FakeBuilder()
    with pytest.raises(RangeError, match="multiple of 8"):
        _build(fake_dir, builder, height=300)
    assert builder.calls == [] and not (fake_dir / "engines").exists()


# -- precision --------------------------------------------------------------------------------


def test_precision_plans():
    from sdrt.export.build import plan_precision

    # fp16 graphs (sdrt export --fp16): strongly typed, whatever TensorRT
    for has in (True, False):
        p = plan_precision("unet", "fp16", fp16_vae=False, has_fp16_flag=has)
        assert (p.precision, p.strongly_typed, p.fp16_flag) == ("fp16", True, False)
    # fp32 graph on TensorRT 10 (FP16 flag): weakly typed fp16 for text encoder / UNet
    p = plan_precision("text_encoder_2", "fp32", fp16_vae=False, has_fp16_flag=True)
    assert (p.precision, p.strongly_typed, p.fp16_flag) == ("fp16", False, True)
    # the VAE stays fp32 (TF32) unless --fp16-vae
    p = plan_precision("vae_decoder", "fp32", fp16_vae=False, has_fp16_flag=True)
    assert (p.precision, p.fp16_flag) == ("fp32", False)
    p = plan_precision("vae_decoder", "fp32", fp16_vae=True, has_fp16_flag=True)
    assert (p.precision, p.fp16_flag) == ("fp16", True)
    # TensorRT 11 (no FP16 flag): an fp32 graph gives an fp32 engine, with a note
    p = plan_precision("unet", "fp32", fp16_vae=False, has_fp16_flag=False)
    assert (p.precision, p.strongly_typed, p.fp16_flag) == ("fp32", True, False) and "--fp16" in p.note


# -- building: records, reuse, atomic writes ------------------------------------------------


def test_build_writes_plans_and_records(fake_dir):
    rows, builder = _build(fake_dir, height=512, max_height=768, batch=1, max_batch=2, optimization_level=4,
                           workspace_gib=2.0)
    key = gpu_key(H100)
    assert [r["status"] for r in rows] == ["built"] * 4
    m = _load(fake_dir)
    entry = m["engines"][key]
    assert entry["gpu_name"] == H100.gpu_name and entry["compute_capability"] == "9.0"
    assert entry["tensorrt_version"] == "10.8.0.43"
    for comp, rec in entry["components"].items():
        plan = fake_dir / rec["file"]
        assert rec["file"] == f"engines/{key}/{comp}.plan" and plan.is_file()
        assert rec["size_bytes"] == plan.stat().st_size
        assert rec["onnx_sha256"] == m["components"][comp]["sha256"]
        assert "onnx_external_data_sha256" in rec and rec["build_seconds"] >= 0 and rec["built_at"].endswith("Z")
        assert set(rec["profile"]) == {t["name"] for t in m["components"][comp]["inputs"]}
    assert entry["components"]["unet"]["precision"] == "fp16"
    assert entry["components"]["vae_decoder"]["precision"] == "fp32"
    assert entry["components"]["unet"]["profile"]["sample"]["max"] == [4, 4, 96, 96]
    assert builder.calls[0]["optimization_level"] == 4 and builder.calls[0]["workspace_gib"] == 2.0
    leftovers = [p.name for p in (fake_dir / "engines" / key).iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not [p for p in fake_dir.iterdir() if p.name.startswith(".sdrt.json")]
    # the model's other records are untouched
    assert {k: v for k, v in m.items() if k != "engines"} == {k: v for k, v in _manifest().items() if k != "engines"}


def test_build_reuses_up_to_date_engines_and_rebuilds_on_change(fake_dir):
    _build(fake_dir)
    rows, builder = _build(fake_dir)
    assert [r["status"] for r in rows] == ["reused"] * 4 and builder.calls == []

    # a new profile: only the components whose inputs depend on the image size are rebuilt
    rows, builder = _build(fake_dir, max_height=1024)
    assert {r["component"]: r["status"] for r in rows} == {
        "text_encoder": "reused", "unet": "built", "vae_decoder": "built", "vae_encoder": "built"}

    # precision change (--fp16-vae) rebuilds the VAE only
    rows, _ = _build(fake_dir, max_height=1024, fp16_vae=True)
    assert {r["component"] for r in rows if r["status"] == "built"} == {"vae_decoder", "vae_encoder"}

    # a re-exported ONNX (new sha256) rebuilds that component
    m = _load(fake_dir)
    m["components"]["unet"]["sha256"] = "f" * 64
    (fake_dir / "sdrt.json").write_text(json.dumps(m))
    rows, builder = _build(fake_dir, max_height=1024, fp16_vae=True)
    assert [c["component"] for c in builder.calls] == ["unet"]
    assert _load(fake_dir)["engines"][gpu_key(H100)]["components"]["unet"]["onnx_sha256"] == "f" * 64

    # --force rebuilds everything; --components limits the work
    rows, builder = _build(fake_dir, max_height=1024, fp16_vae=True, force=True, components=["unet", "text_encoder"])
    assert [c["component"] for c in builder.calls] == ["text_encoder", "unet"]


def test_reuse_decision_reasons(fake_dir):
    _build(fake_dir)
    m = _load(fake_dir)
    rec = m["engines"][gpu_key(H100)]["components"]["unet"]
    comp = m["components"]["unet"]
    kw = dict(component_record=comp, profile=rec["profile"], precision=rec["precision"], model_dir=fake_dir)
    assert reuse_decision(rec, **kw) == (True, "up to date")
    assert reuse_decision(rec, **kw, force=True) == (False, "--force")
    assert reuse_decision(None, **kw)[1] == "not built yet"
    assert "ONNX changed" in reuse_decision({**rec, "onnx_external_data_sha256": "x"}, **kw)[1]
    assert "profile" in reuse_decision(rec, **{**kw, "profile": {}})[1]
    assert "precision" in reuse_decision(rec, **{**kw, "precision": "fp32"})[1]
    (fake_dir / rec["file"]).write_bytes(b"truncated")
    assert "does not match" in reuse_decision(rec, **kw)[1]
    (fake_dir / rec["file"]).unlink()
    assert "missing" in reuse_decision(rec, **kw)[1]


def test_refittable_build_records_and_reuse(fake_dir):
    _build(fake_dir, components=["unet"])
    rec = _load(fake_dir)["engines"][gpu_key(H100)]["components"]["unet"]
    assert rec["refittable"] is False
    logs = []
    from sdrt.export.build import build_engines

    builder = FakeBuilder()
    rows = build_engines(fake_dir, components=["unet"], refittable=True, builder=builder, log=logs.append)
    assert rows[0]["status"] == "built" and builder.calls[0]["refittable"] is True
    assert any("unet: building fp16 refittable engine (the engine is not refittable (--refittable))" in m for m in logs)
    assert _load(fake_dir)["engines"][gpu_key(H100)]["components"]["unet"]["refittable"] is True
    rows, builder = _build(fake_dir, components=["unet"], refittable=True)
    assert rows[0]["status"] == "reused" and builder.calls == []
    rows, builder = _build(fake_dir, components=["unet"])  # a refittable engine also serves a plain build
    assert rows[0]["status"] == "reused"
    rows, builder = _build(fake_dir, components=["unet"], refittable=True, max_height=1024)  # other reasons still count
    assert rows[0]["status"] == "built" and rows[0]["reason"] == "the profile changed"


def test_sdrt_build_refittable_flag(fake_dir, monkeypatch, capsys):
    from sdrt.cli import main
    from sdrt.export import build

    monkeypatch.setattr(build, "TensorRTBuilder", FakeBuilder)
    assert main(["build", str(fake_dir), "--components", "unet", "--refittable"]) == 0
    assert "unet: building fp16 refittable engine" in capsys.readouterr().out
    assert _load(fake_dir)["engines"][gpu_key(H100)]["components"]["unet"]["refittable"] is True


def test_tensorrt_builder_sets_the_refit_flag(tmp_path):
    """TensorRTBuilder.build against a stand-in for the tensorrt module: REFIT only with refittable."""
    from types import SimpleNamespace as NS

    from sdrt.export.build import PrecisionPlan, TensorRTBuilder

    flags = []

    class Config:
        def set_flag(self, flag):
            flags.append(flag)

        def __getattr__(self, name):  # memory pools, profiles, timing cache: accepted, unused
            return lambda *a, **k: NS(serialize=lambda: b"")

    trt = NS(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        BuilderFlag=NS(FP16="FP16", REFIT="REFIT"), MemoryPoolType=NS(WORKSPACE=0),
        NetworkDefinitionCreationFlag=NS(STRONGLY_TYPED=1),
        OnnxParser=lambda network, logger: NS(parse_from_file=lambda path: True),
        Builder=lambda logger: NS(create_network=lambda flags: "network", create_builder_config=Config,
                                  create_optimization_profile=lambda: NS(set_shape=lambda *a: None),
                                  build_serialized_network=lambda network, config: b"plan"),
    )
    builder = TensorRTBuilder.__new__(TensorRTBuilder)
    builder.trt = trt
    plan = PrecisionPlan("fp16", False, True)
    prof = {"sample": {"min": [1], "opt": [1], "max": [1]}}
    kw = dict(timing_cache=None, optimization_level=None, workspace_gib=None)
    assert builder.build(tmp_path / "model.onnx", prof, plan, refittable=True, **kw) == (b"plan", None)
    assert flags == ["FP16", "REFIT"]
    flags.clear()
    builder.build(tmp_path / "model.onnx", prof, plan, **kw)
    assert flags == ["FP16"]


def test_another_gpu_gets_its_own_engine_folder(fake_dir):
    _build(fake_dir)
    rows, builder = _build(fake_dir, FakeBuilder(facts=A100))
    assert [r["status"] for r in rows] == ["built"] * 4
    assert set(_load(fake_dir)["engines"]) == {gpu_key(H100), gpu_key(A100)}


def test_interrupted_build_keeps_finished_engines_recorded(fake_dir):
    with pytest.raises(RuntimeError, match="boom"):
        _build(fake_dir, FakeBuilder(fail_on="vae_decoder"))
    m = _load(fake_dir)  # still valid JSON
    assert set(m["engines"][gpu_key(H100)]["components"]) == {"text_encoder", "unet"}
    assert not (fake_dir / "engines" / gpu_key(H100) / "vae_decoder.plan").exists()
    assert not [p for p in (fake_dir / "engines" / gpu_key(H100)).iterdir() if p.name.startswith(".")]
    rows, builder = _build(fake_dir)  # picks up where it stopped
    assert [c["component"] for c in builder.calls] == ["vae_decoder", "vae_encoder"]


def test_plan_write_is_atomic(tmp_path, monkeypatch):
    from sdrt.export import build

    target = tmp_path / "unet.plan"
    target.write_bytes(b"old engine")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(build.os, "replace", broken_replace)
    with pytest.raises(OSError):
        build._write_atomic(target, b"new engine")
    assert target.read_bytes() == b"old engine" and [p.name for p in tmp_path.iterdir()] == ["unet.plan"]


def test_timing_cache_loaded_and_saved(fake_dir, tmp_path):
    cache = tmp_path / "caches" / "timing.cache"
    cache.parent.mkdir()
    _, builder = _build(fake_dir, timing_cache=cache, components=["text_encoder", "unet"])
    assert builder.calls[0]["timing_cache"] == b""  # no file yet: a fresh cache
    assert builder.calls[1]["timing_cache"] == b"text_encoder"  # the first build's cache, carried on
    assert cache.read_bytes() == b"text_encoderunet"
    _, builder = _build(fake_dir, timing_cache=cache, force=True, components=["unet"])
    assert builder.calls[0]["timing_cache"] == b"text_encoderunet"


def test_build_unknown_component(fake_dir):
    from sdrt.export.build import BuildError

    with pytest.raises(BuildError, match="unknown component.*text_encoder, unet"):
        _build(fake_dir, components=["unet", "controlnet"])


def test_info_lists_built_engines(fake_dir):
    from sdrt.runtime.info import describe

    _build(fake_dir)
    text = describe(fake_dir)
    assert gpu_key(H100) in text and "H100" in text and "unet" in text


# -- the runtime's checks: refusals ----------------------------------------------------------


def _built_manifest(root) -> dict:
    _build(root)
    return _load(root)


def test_engine_set_for_this_gpu_is_accepted(fake_dir):
    m = _built_manifest(fake_dir)
    recs = check_engine_set(m, H100, fake_dir)
    assert set(recs) == {"text_encoder", "unet", "vae_decoder"}  # the VAE encoder is optional
    assert set(check_engine_set(m, H100, fake_dir, ["vae_encoder"])) == {"vae_encoder"}


def test_refuses_engines_for_another_gpu(fake_dir):
    m = _built_manifest(fake_dir)
    other = DeviceFacts("NVIDIA L4", "8.9", "10.8.0.43")
    with pytest.raises(EngineMismatch) as e:
        check_engine_set(m, other, fake_dir)
    msg = str(e.value)
    assert "the GPU differs (NVIDIA H100 80GB HBM3 vs NVIDIA L4 here)" in msg
    assert "compute capability differs (9.0 vs 8.9 here)" in msg
    assert f"sdrt build {fake_dir}" in msg


def test_refuses_engines_for_another_compute_capability(fake_dir):
    m = _built_manifest(fake_dir)
    m["engines"][gpu_key(H100)]["compute_capability"] = "8.0"  # same key, record says otherwise
    with pytest.raises(EngineMismatch, match=r"compute capability differs \(8.0 vs 9.0 here\).*sdrt build"):
        check_engine_set(m, H100, fake_dir)


def test_refuses_engines_for_another_tensorrt_version(fake_dir):
    m = _built_manifest(fake_dir)
    newer = DeviceFacts(H100.gpu_name, "9.0", "10.9.0.34")
    with pytest.raises(EngineMismatch, match=r"TensorRT version differs \(10.8.0.43 vs 10.9.0.34 here\)"):
        check_engine_set(m, newer, fake_dir)
    build_no = DeviceFacts(H100.gpu_name, "9.0", "10.8.0.40")  # same key, other build
    with pytest.raises(EngineMismatch, match=r"TensorRT version differs \(10.8.0.43 vs 10.8.0.40 here\)"):
        check_engine_set(m, build_no, fake_dir)


def test_refuses_engine_built_from_another_onnx(fake_dir):
    m = _built_manifest(fake_dir)
    m["components"]["unet"]["sha256"] = "e" * 64
    with pytest.raises(EngineMismatch) as e:
        check_engine_set(m, H100, fake_dir)
    assert "unet engine was built from a different ONNX" in str(e.value)
    assert f"sdrt build {fake_dir} --components unet" in str(e.value)
    m = _built_manifest(fake_dir)
    m["components"]["unet"]["external_data_sha256"] = "d" * 64
    with pytest.raises(EngineMismatch, match="onnx_external_data_sha256"):
        check_engine_set(m, H100, fake_dir)


def test_refuses_missing_or_altered_plan_and_missing_engines(fake_dir):
    m = _built_manifest(fake_dir)
    (fake_dir / m["engines"][gpu_key(H100)]["components"]["unet"]["file"]).write_bytes(b"x")
    with pytest.raises(EngineMismatch, match="does not match its record"):
        check_engine_set(m, H100, fake_dir)
    (fake_dir / m["engines"][gpu_key(H100)]["components"]["unet"]["file"]).unlink()
    with pytest.raises(EngineMismatch, match="is missing"):
        check_engine_set(m, H100, fake_dir)
    del m["engines"][gpu_key(H100)]["components"]["vae_decoder"]
    with pytest.raises(EngineMismatch, match="no TensorRT engine for vae_decoder.*--components vae_decoder"):
        check_engine_set(m, H100, fake_dir, ["vae_decoder"])
    with pytest.raises(EngineMismatch, match="has no TensorRT engines; build them"):
        check_engine_set({**m, "engines": {}}, H100, fake_dir)


# -- shapes outside the profile ---------------------------------------------------------------


def _profile_for(m, comp, **kw):
    return component_profile(m, comp, resolve_ranges(m, **kw))


def test_shape_outside_profile_names_the_range_and_the_flag():
    m = _manifest()
    prof = _profile_for(m, "unet", height=512, min_height=256, max_height=768, max_batch=2)
    rec = m["components"]["unet"]
    ok = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    check_shapes("unet", rec, prof, ok, model_dir="/m")
    with pytest.raises(ShapeOutsideProfile) as e:
        check_shapes("unet", rec, prof, {**ok, "sample": (2, 4, 128, 64)}, model_dir="/m")
    assert str(e.value) == ("height 1024 is outside the unet engine's profile 256..768; "
                            "rebuild with sdrt build /m --max-height 1024")
    with pytest.raises(ShapeOutsideProfile, match=r"width 128 is outside .* 256..768; rebuild with sdrt build /m --min-width 128"):
        check_shapes("unet", rec, prof, {**ok, "sample": (2, 4, 64, 16)}, model_dir="/m")
    with pytest.raises(ShapeOutsideProfile, match=r"batch 6 .*profile 1..4 .*--max-batch 3"):
        check_shapes("unet", rec, prof, {"sample": (6, 4, 64, 64)}, model_dir="/m")
    dec = _profile_for(m, "vae_decoder", max_batch=2)
    with pytest.raises(ShapeOutsideProfile, match=r"batch 3 is outside the vae_decoder engine's profile 1..2; .*--max-batch 3"):
        check_shapes("vae_decoder", m["components"]["vae_decoder"], dec, {"latent_sample": (3, 4, 64, 64)}, model_dir="/m")


def test_shape_outside_static_profile():
    m = _manifest()
    prof = _profile_for(m, "vae_decoder", height=512, width=512, static=True)
    with pytest.raises(ShapeOutsideProfile, match=r"height 768 .*512..512; rebuild with sdrt build DIR --height 768 --static"):
        check_shapes("vae_decoder", m["components"]["vae_decoder"], prof, {"latent_sample": (1, 4, 96, 64)})


# -- backend selection without TensorRT -------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` and `import cuda...` fail, whatever is installed."""
    from sdrt.runtime.backends import tensorrt as trt_backend

    for mod in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setattr(trt_backend, "_facts_cache", [])


def test_sdrt_build_without_tensorrt_is_one_line_naming_the_install(fake_dir, no_tensorrt, capsys):
    from sdrt.cli import main

    code = main(["build", str(fake_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "pip install 'sdrt[tensorrt]'" in err and "needs an NVIDIA GPU" in err and "tensorrt" in err
    assert not (fake_dir / "engines").exists()


def test_sdrt_build_cli_progress_and_summary(fake_dir, monkeypatch, capsys):
    from sdrt.cli import main
    from sdrt.export import build

    monkeypatch.setattr(build, "TensorRTBuilder", FakeBuilder)
    code = main(["build", str(fake_dir), "--components", "text_encoder,unet", "--max-batch", "2",
                 "--optimization-level", "3", "--workspace", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[1/2] text_encoder: building fp16 engine (not built yet)" in out
    assert "[2/2] unet: built in" in out and "MiB" in out
    assert "component" in out.splitlines()[-3] and "built" in out.splitlines()[-1]
    code = main(["build", str(fake_dir), "--components", "unet", "--max-batch", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "unet: up to date" in out and out.splitlines()[-1].endswith("reused")


def test_sdrt_build_bad_range_is_one_line(fake_dir, capsys):
    from sdrt.cli import main

    code = main(["build", str(fake_dir), "--height", "512", "--max-height", "384"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "--height 512 is larger than --max-height 384" in err


def test_backend_tensorrt_without_tensorrt_names_the_install(fake_dir, no_tensorrt):
    from sdrt.runtime.backends import BackendUnavailable, resolve_backend

    m = _built_manifest(fake_dir)
    with pytest.raises(BackendUnavailable, match=r"sdrt\[tensorrt\].*needs an NVIDIA GPU"):
        resolve_backend("tensorrt", fake_dir, m)
    with pytest.raises(BackendUnavailable, match=r"sdrt\[tensorrt\]"):
        resolve_backend("trt")


def test_auto_without_tensorrt_quietly_uses_onnxruntime_even_with_engines(fake_dir, no_tensorrt):
    from sdrt.runtime.backends import resolve_backend

    m = _built_manifest(fake_dir)
    assert m["engines"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", fake_dir, m) in ("ort-cpu", "ort-cuda")


def test_auto_pipeline_without_tensorrt_uses_onnxruntime(model_dir, tmp_path, no_tensorrt):
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    _build(root)  # engines recorded (fake plans), TensorRT absent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = Pipeline.load(root, backend="auto", cuda_graph=True)
    try:
        assert pipe.backend in ("ort-cpu", "ort-cuda")
        out = pipe("a cat", num_inference_steps=2, output_type="np", seed=0)
        assert out.images.shape[0] == 1
    finally:
        pipe.close()


# -- backend selection with fake device facts -----------------------------------------------


@pytest.fixture
def on_machine(monkeypatch):
    """on_machine(facts): the TensorRT backend believes it runs on ``facts`` (no TensorRT needed)."""
    from sdrt.runtime.backends import tensorrt as trt_backend

    monkeypatch.setattr(trt_backend, "_warned", set())

    def use(facts):
        monkeypatch.setattr(trt_backend, "device_facts", lambda *a, **k: facts)

    return use


def test_auto_picks_tensorrt_when_engines_match_this_gpu(fake_dir, on_machine):
    from sdrt.runtime.backends import resolve_backend

    m = _built_manifest(fake_dir)
    on_machine(H100)
    assert resolve_backend("auto", fake_dir, m) == "tensorrt"
    assert resolve_backend("tensorrt", fake_dir, m) == "tensorrt"


def test_auto_without_engines_never_asks_for_tensorrt(fake_dir, monkeypatch):
    from sdrt.runtime.backends import resolve_backend
    from sdrt.runtime.backends import tensorrt as trt_backend

    def boom(*a, **k):
        raise AssertionError("device_facts should not be needed")

    monkeypatch.setattr(trt_backend, "device_facts", boom)
    assert resolve_backend("auto", fake_dir, _load(fake_dir)) in ("ort-cpu", "ort-cuda")


@pytest.mark.parametrize(
    "facts, expect",
    [
        (DeviceFacts("NVIDIA L40S", "8.9", "10.8.0.43"), "the GPU differs"),
        (DeviceFacts(H100.gpu_name, "9.0", "10.9.0.34"), "the TensorRT version differs"),
    ],
)
def test_refused_engines_tensorrt_errors_and_auto_falls_back_once(fake_dir, on_machine, facts, expect):
    from sdrt.runtime.backends import BackendUnavailable, resolve_backend

    m = _built_manifest(fake_dir)
    on_machine(facts)
    with pytest.raises(BackendUnavailable, match=expect) as e:
        resolve_backend("tensorrt", fake_dir, m)
    assert "sdrt build" in str(e.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", fake_dir, m) in ("ort-cpu", "ort-cuda")
        assert resolve_backend("auto", fake_dir, m) in ("ort-cpu", "ort-cuda")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and expect in msgs[0] and "using ONNX Runtime instead" in msgs[0]


def test_refused_changed_onnx_auto_falls_back(fake_dir, on_machine):
    from sdrt.runtime.backends import BackendUnavailable, resolve_backend

    m = _built_manifest(fake_dir)
    m["components"]["text_encoder"]["sha256"] = "0" * 64
    on_machine(H100)
    with pytest.raises(BackendUnavailable, match="built from a different ONNX"):
        resolve_backend("tensorrt", fake_dir, m)
    with pytest.warns(UserWarning, match="different ONNX.*using ONNX Runtime"):
        assert resolve_backend("auto", fake_dir, m) != "tensorrt"


def test_runtime_modules_do_not_import_tensorrt_or_torch():
    import subprocess

    code = (
        "import sys, sdrt, sdrt.runtime.engines, sdrt.runtime.backends.tensorrt, sdrt.runtime.pipeline, sdrt.cli;"
        "bad = [m for m in ('tensorrt', 'torch', 'diffusers', 'transformers', 'cuda') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- with TensorRT and a GPU ----------------------------------------------------------------


def _gpu_or_skip():
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'sdrt[tensorrt]') and an NVIDIA GPU")
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("needs cuda-python (pip install 'sdrt[tensorrt]')")
    from sdrt.runtime.backends import BackendUnavailable
    from sdrt.runtime.backends.tensorrt import device_facts

    try:
        return device_facts()
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.tensorrt
def test_real_build_and_run_matches_onnxruntime(model_dir, tmp_path):
    facts = _gpu_or_skip()
    from sdrt.export.build import build_engines
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    rows = build_engines(root, height=128, min_height=64, max_height=192, max_batch=2, log=lambda *_: None)
    assert {r["status"] for r in rows} == {"built"}
    assert gpu_key(facts) in _load(root)["engines"]
    rows = build_engines(root, height=128, min_height=64, max_height=192, max_batch=2, log=lambda *_: None)
    assert {r["status"] for r in rows} == {"reused"}

    trt_pipe = Pipeline.load(root, backend="tensorrt")
    ort_pipe = Pipeline.load(root, backend="ort-cpu")
    try:
        assert trt_pipe.backend == "tensorrt"
        # the fp32/TF32 VAE decoder engine against ONNX Runtime
        z = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
        a = trt_pipe.engine("vae_decoder")(latent_sample=z)["sample"]
        b = ort_pipe.engine("vae_decoder")(latent_sample=z)["sample"]
        assert np.abs(a - b).max() < 1e-2
        kw = dict(num_inference_steps=3, output_type="np", seed=0, height=128, width=128)
        x, y = trt_pipe("a cat", **kw).images, ort_pipe("a cat", **kw).images
        assert np.abs(x - y).max() < 0.05  # fp16 text encoder and UNet
        with pytest.raises(ShapeOutsideProfile, match="--max-height 256"):
            trt_pipe("a cat", num_inference_steps=1, height=256, width=128, output_type="np")
    finally:
        trt_pipe.close()
        ort_pipe.close()


@pytest.mark.tensorrt
def test_real_cuda_graph_replays_unet(model_dir, tmp_path):
    _gpu_or_skip()
    from sdrt.export.build import build_engines
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    build_engines(root, height=128, width=128, static=True, components=["text_encoder", "unet", "vae_decoder"],
                  log=lambda *_: None)
    plain = Pipeline.load(root, backend="tensorrt")
    graph = Pipeline.load(root, backend="tensorrt", cuda_graph=True)
    try:
        kw = dict(num_inference_steps=4, output_type="np", seed=0)
        a, b = plain("a cat", **kw).images, graph("a cat", **kw).images
        unet = graph.engine("unet")._get()
        assert unet.graph_replays >= 2  # captured on the first step, replayed after
        assert np.abs(a - b).max() < 1e-3
    finally:
        plain.close()
        graph.close()
