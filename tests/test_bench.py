"""`sdrt bench` (sdrt.benchmarks): the harness's report structure on the small sd1 workload (never a timing),
the FLOP counter on a hand-built graph, and the statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdrt.benchmarks import stats

# ---------------------------------------------------------------------------------------------- stats


def test_median_and_p90_interpolate_like_numpy():
    xs = [3.0, 1.0, 2.0, 10.0, 4.0, 6.0, 5.0, 9.0, 8.0, 7.0]
    assert stats.median(xs) == 5.5
    assert stats.percentile(xs, 90) == pytest.approx(9.1)  # rank (n - 1) * 0.9 = 8.1 between 9 and 10
    for q in (0, 10, 50, 90, 100):
        assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert stats.median([4.0, 1.0, 2.0]) == 2.0
    s = stats.summarize([0.2])
    assert s == {"n": 1, "median": 0.2, "p90": 0.2, "min": 0.2, "max": 0.2, "mean": 0.2}
    s = stats.summarize([1, 2, 3, 4])
    assert (s["median"], s["min"], s["max"], s["mean"]) == (2.5, 1, 4, 2.5)
    assert s["p90"] == pytest.approx(3.7)
    assert stats.summarize([]) is None
    assert stats.ratio(1.0, 4.0) == 0.25 and stats.ratio(None, 1.0) is None and stats.ratio(1.0, 0) is None
    with pytest.raises(ValueError):
        stats.percentile([], 50)


# ---------------------------------------------------------------------------------------------- FLOPs


def _tiny_graph(path):
    """x (batch, 3, H, W) -> Conv 8x3x3x3 (pad 1) -> Reshape (batch, 8, H*W) -> Transpose -> MatMul (H*W x 8) @ (8 x 16)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((8, 16), np.float32), "m")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Shape", ["c"], ["c_shape"]),
        helper.make_node("Gather", ["c_shape", "idx01"], ["bc"], axis=0),
        helper.make_node("Concat", ["bc", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["c", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tokens", "m"], ["y"], name="matmul"),
    ]
    inits = [w, m, numpy_helper.from_array(np.array([0, 1], np.int64), "idx01"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None, 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_flop_counter_on_a_hand_built_graph(tmp_path, external):
    from sdrt.benchmarks.flops import graph_flops

    path = tmp_path / "tiny.onnx"
    _tiny_graph(path)
    if external:  # every initializer in model.onnx_data, as a >2 GB UNet keeps its weights
        import onnx

        model = onnx.load(str(path))
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx_data", size_threshold=0)
    n, h, w = 2, 6, 5
    count = graph_flops(path, dims={"batch": n, "height": h, "width": w})
    conv = 2 * (n * 8 * h * w) * (3 * 3 * 3)  # output elements x (C_in x kh x kw) MACs, x2
    matmul = 2 * (n * h * w * 16) * 8  # output elements x K MACs, x2
    assert count.unresolved == []
    assert count.by_op == {"Conv": conv, "MatMul": matmul}
    assert count.nodes == {"Conv": 1, "MatMul": 1}
    assert count.flops == conv + matmul == 25920 + 15360


def test_flop_counter_fixes_inputs_by_name_and_handles_convtranspose_and_gemm(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.benchmarks.flops import graph_flops

    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["up"], strides=[2, 2], name="up"),  # 4 -> 8 channels, 2x2
        helper.make_node("Flatten", ["up"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1, name="gemm"),
    ]
    inits = [numpy_helper.from_array(np.zeros((4, 8, 2, 2), np.float32), "wt"),
             numpy_helper.from_array(np.zeros((10, 8 * 6 * 6), np.float32), "g")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    count = graph_flops(path, shapes={"x": [3, 4, 3, 3]})
    assert count.by_op["ConvTranspose"] == 2 * (3 * 4 * 3 * 3) * (8 * 2 * 2)  # input elements x C_out x kernel
    assert count.by_op["Gemm"] == 2 * (3 * 10) * (8 * 6 * 6)


# ---------------------------------------------------------------------------------------------- the harness

STAGE_KEYS = ("end_to_end", "text_encoder", "unet_step", "unet_total", "vae_decoder", "other")


@pytest.fixture(scope="module")
def bench_report(checkpoint, model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sdrt.benchmarks.bench import main

    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--checkpoint", str(checkpoint("sd1")), "--model", str(model_dir("sd1")),
        "--contenders", "sdrt-ort-cpu,sdrt-ort-cpu-lowmem,sdrt-tensorrt,diffusers",
        "--runs", "1", "--warmup", "0", "--height", "64", "--width", "64", "--steps", "2", "--threads", "1",
        "--roofline-sizes", "64,128", "--cache-dir", str(out / "cache"),
        "--json", str(out / "bench.json"), "--out", str(out / "report"),
    ]
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.slow
def test_bench_report_structure(bench_report):
    report, out = bench_report
    assert report["format"] == "sdrt-bench/1"
    s = report["settings"]
    assert (s["height"], s["width"], s["steps"], s["runs"], s["warmup"]) == (64, 64, 2, 1, 0)
    assert s["latent_shape"] == [1, 4, 8, 8]

    m = report["machine"]
    for key in ("cpu_model", "cpu_physical_cores", "cpu_logical_cores", "gpus", "versions", "onnxruntime_providers"):
        assert key in m
    for lib in ("numpy", "onnxruntime", "torch", "diffusers"):
        assert lib in m["versions"]
    assert m["versions"]["numpy"] and m["versions"]["torch"] and m["versions"]["diffusers"]

    cs = report["contenders"]
    assert list(cs) == ["sdrt-ort-cpu", "sdrt-ort-cpu-lowmem", "sdrt-tensorrt", "diffusers"]
    for name in ("sdrt-ort-cpu", "diffusers"):
        r = cs[name]
        assert r["status"] == "ok", r.get("reason")
        for key in STAGE_KEYS:
            st = r["latency_s"][key]
            assert set(st) >= {"median", "p90", "min"}
            assert all(math.isfinite(st[k]) and st[k] >= 0 for k in ("median", "p90", "min"))
        # one UNet call per step (guidance batched), plus PNDM's extra first call: the same count on both sides
        assert r["latency_s"]["unet_step"]["n"] == s["runs"] * r["unet_calls_per_run"]
        assert r["unet_calls_per_run"] == cs["diffusers"]["unet_calls_per_run"] >= s["steps"]
        assert r["latency_s"]["end_to_end"]["median"] > 0
        assert r["cold_start_s"] is not None and r["cold_start_s"] > 0
        assert r["peak_rss_bytes"] > 0
    # each contender's peak is its own (not the parent's RSS inherited at fork): torch makes diffusers' larger
    assert cs["sdrt-ort-cpu"]["peak_rss_bytes"] < cs["diffusers"]["peak_rss_bytes"]
    for name in ("sdrt-ort-cpu", "diffusers"):
        r = cs[name]
        assert r["image_max_abs_diff"] is not None and r["image_max_abs_diff"] <= 2e-3
        assert r["image_matches"] is True
        assert r["roofline"]["unet_flops_per_call"] > 0 and r["roofline"]["achieved_flops_per_s"] > 0
        assert 0 < r["roofline"]["fraction_of_peak"]
    assert cs["diffusers"]["image_max_abs_diff"] == 0.0
    # the sdrt worker stays torch-free; the diffusers one is torch
    assert cs["sdrt-ort-cpu"]["torch_imported"] is False and cs["sdrt-ort-cpu"]["forbidden_modules_loaded"] == []
    assert cs["diffusers"]["torch_imported"] is True
    for name, r in cs.items():
        assert r["status"] in ("ok", "skipped", "failed")
        if r["status"] != "ok":
            assert isinstance(r.get("reason"), str) and r["reason"], name
    lowmem = cs["sdrt-ort-cpu-lowmem"]
    assert lowmem["status"] == "ok" or "low_memory" in lowmem["reason"]
    if lowmem["status"] == "ok":
        assert lowmem["low_memory"] is True

    roof = report["roofline"]
    assert roof["unet"]["flops"] > 0 and roof["unet"]["unresolved_nodes"] == []
    assert roof["unet"]["unet_batch"] == 2  # guidance 7.5 doubles the batch
    assert roof["cpu_fp32"]["status"] == "ok" and roof["cpu_fp32"]["flops_per_s"] > 0
    assert "numpy" in roof["cpu_fp32"]["library"]

    ratios = report["ratios"]["sdrt-ort-cpu"]
    for key in ("end_to_end", "unet_step", "peak_rss", "cold_start", "time_to_ready"):
        assert ratios[key] is not None and ratios[key] > 0
    # time to ready (imports + load) is part of the cold start
    for name in ("sdrt-ort-cpu", "diffusers"):
        assert 0 < cs[name]["import_s"] + cs[name]["load_s"] < cs[name]["cold_start_s"]
    assert any(line.startswith("sdrt-ort-cpu / diffusers:") for line in report["summary"])

    # each contender's cold start found its files in the page cache (read just before it was spawned)
    assert s["page_cache"] == "warm"
    for name in ("sdrt-ort-cpu", "diffusers"):
        warmed = cs[name]["page_cache_warmed"]
        assert warmed["files"] > 0 and warmed["mib"] > 0
    assert cs["diffusers"]["page_cache_warmed"]["mib"] > cs["sdrt-ort-cpu"]["page_cache_warmed"]["mib"]  # torch

    # and its engine caches filled by a 1-step run before it (ONNX Runtime's optimized graphs: all hits)
    assert s["engine_cache"] == "warm"
    assert set(cs["sdrt-ort-cpu"]["engine_cache"]) >= {"text_encoder", "unet", "vae_decoder"}
    assert set(cs["sdrt-ort-cpu"]["engine_cache"].values()) == {"hit"}

    md = (out / "report" / "bench.md").read_text()
    assert "page cache warmed before each contender" in md and "engine caches filled before its cold start" in md
    assert "its cold start filled engine caches" not in md
    assert "| sdrt-ort-cpu |" in md and "| diffusers |" in md and "sdrt-tensorrt" in md and "Roofline" in md
    png = (out / "report" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_contender_names_and_workload_defaults():
    from sdrt.benchmarks.bench import BenchError, build_parser, parse_contenders, settings_from_args

    assert parse_contenders("sdrt-ort-cpu,diffusers", low_memory=True) == ["sdrt-ort-cpu", "sdrt-ort-cpu-lowmem", "diffusers"]
    assert parse_contenders(None, low_memory=False)[0] == "sdrt-ort-cpu"
    with pytest.raises(BenchError, match="unknown contender"):
        parse_contenders("sdrt-onnx", low_memory=False)
    s = settings_from_args(build_parser().parse_args(["--workload", "sd1-full", "--runs", "5"]))
    assert (s["height"], s["width"], s["scheduler"], s["steps"], s["guidance"], s["batch"], s["runs"], s["warmup"]) == (
        256, 256, "dpm++2m", 10, 7.5, 1, 5, 1)
    s = settings_from_args(build_parser().parse_args(["--workload", "sd1"]))
    assert (s["height"], s["steps"], s["runs"], s["warmup"]) == (64, 4, 2, 1)


def test_engine_cache_states_read_through_wrappers_and_summarize():
    from sdrt.benchmarks.bench import _states
    from sdrt.runtime.backends import LazyEngine, cache_states
    from sdrt.runtime.precision import FixedWeights

    class Fake:
        def __init__(self, name, cache):
            self.name, self.cache_state = name, cache

    opened = LazyEngine("vae_decoder", lambda weights: Fake("vae_decoder", "filled"))
    opened._get()
    engines = {"unet": FixedWeights(Fake("unet", "hit")), "text_encoder": Fake("text_encoder", "hit"),
               "vae_decoder": opened, "vae_encoder": LazyEngine("vae_encoder", None), "trt": object()}
    states = cache_states(engines)
    assert states == {"unet": "hit", "text_encoder": "hit", "vae_decoder": "filled"}  # unopened, cacheless: left out
    assert _states(states) == "filled: vae_decoder; hit: unet, text_encoder" and _states({}) == "none kept"


def test_mismatched_image_is_flagged_and_not_ranked():
    from sdrt.benchmarks import report as report_mod
    from sdrt.benchmarks.bench import _compare_images

    def ok(e2e, img):
        lat = {k: {"n": 1, "median": e2e, "p90": e2e, "min": e2e} for k in STAGE_KEYS}
        return {"status": "ok", "kind": "x", "latency_s": lat, "image_array": img, "peak_rss_bytes": 1, "cold_start_s": 1.0}

    ref = np.zeros((1, 8, 8, 3), np.float32)
    cs = {"sdrt-ort-cpu": ok(0.5, ref + 0.01), "sdrt-ort-cpu-lowmem": ok(2.0, ref + 1e-4), "diffusers": ok(1.0, ref)}
    _compare_images(cs, 2e-3)
    assert cs["sdrt-ort-cpu"]["image_matches"] is False and "mismatch" in cs["sdrt-ort-cpu"]["image_note"]
    assert cs["sdrt-ort-cpu-lowmem"]["image_matches"] is True
    report = {"contenders": cs, "reference": "diffusers"}
    assert report_mod.rank(report) == ["diffusers", "sdrt-ort-cpu-lowmem"]
    assert report_mod.ratios(report)["sdrt-ort-cpu"]["image_matches"] is False


def test_page_cache_warming_reads_each_contenders_own_files(tmp_path):
    from sdrt.benchmarks.bench import contender_files, warm_page_cache

    model, ckpt = tmp_path / "model", tmp_path / "ckpt"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "model.onnx").write_bytes(b"x" * 5000)
    (model / "sdrt.json").write_text("{}")
    (model / "link").symlink_to(model / "sdrt.json")  # not read twice
    ckpt.mkdir()
    (model / "unet" / "model.int8.onnx").write_bytes(b"q")
    for entry in ("unet-cpu-0123", "unet-openvino-4567"):
        (model / "cache" / entry).mkdir(parents=True)
        (model / "cache" / entry / "model.onnx").write_bytes(b"c")
    sdrt_paths = contender_files({"kind": "sdrt", "model": str(model), "checkpoint": str(ckpt), "backend": "ort-cpu",
                                  "precision": "fp32"})
    files = {p.relative_to(model).as_posix() for p in sdrt_paths if model in p.parents}
    assert files == {"unet/model.onnx", "sdrt.json", "cache/unet-cpu-0123/model.onnx"}  # its backend, its precision
    assert any(p.name == "onnxruntime" for p in sdrt_paths)
    int8 = contender_files({"kind": "sdrt", "model": str(model), "backend": "openvino", "precision": "int8"})
    assert {p.relative_to(model).as_posix() for p in int8 if model in p.parents} == {
        "unet/model.onnx", "unet/model.int8.onnx", "sdrt.json", "cache/unet-openvino-4567/model.onnx"}
    assert not any(p.name == "torch" for p in sdrt_paths)  # sdrt's cold start reads no torch
    diffusers_paths = contender_files({"kind": "diffusers", "model": str(model), "checkpoint": str(ckpt)})
    assert diffusers_paths[0] == ckpt and any(p.name == "torch" for p in diffusers_paths)
    venv = tmp_path / "venv" / "bin" / "python"
    optimum = contender_files({"kind": "optimum-intel", "ov_model": str(ckpt)}, python=str(venv))
    assert optimum == [ckpt, tmp_path / "venv" / "lib"]

    warmed = warm_page_cache([model / "unet", model / "sdrt.json", tmp_path / "missing"], chunk=4096)
    assert warmed["files"] == 3 and warmed["mib"] * 2**20 == 5003
