"""The openvino backend: the model directory's ONNX graphs behind the Engine interface, image for image
ONNX Runtime's at fp32; the precision choice refused in one line where it cannot run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")

from sdrt.runtime.backends.onnxruntime import OrtEngine  # noqa: E402
from sdrt.runtime.backends.openvino import OvEngine  # noqa: E402
from sdrt.runtime.errors import ConfigError, ModelDirError  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.precision import check  # noqa: E402

CALL = dict(num_inference_steps=4, seed=0, output_type="np", height=64, width=64)


@pytest.fixture(scope="module")
def sd1_copy(model_dir, tmp_path_factory):
    """The sd1 test model without its caches (the tests below fill OpenVINO's)."""
    root = tmp_path_factory.mktemp("ov") / "sd1"
    shutil.copytree(model_dir("sd1"), root, ignore=shutil.ignore_patterns("cache"))
    return root


@pytest.fixture(scope="module")
def ort_image(sd1_copy):
    return Pipeline.load(sd1_copy, backend="ort-cpu")("a red circle", **CALL).images


def test_openvino_fp32_matches_onnx_runtime(sd1_copy, ort_image):
    pipe = Pipeline.load(sd1_copy, backend="openvino")
    out = pipe("a red circle", **CALL)
    assert pipe.backend == "openvino" and out.parameters["backend"] == "openvino"
    assert np.abs(out.images - ort_image).max() <= 2e-3


def test_compiled_models_are_cached_and_a_second_load_reads_the_cache(sd1_copy, ort_image):
    Pipeline.load(sd1_copy, backend="openvino")("a red circle", **CALL)
    entries = list((sd1_copy / "cache").glob("unet-openvino-*"))
    assert entries and any(p.suffix == ".blob" for e in entries for p in e.iterdir())
    pipe = Pipeline.load(sd1_copy, backend="openvino")
    again = pipe("a red circle", **CALL).images
    assert np.abs(again - ort_image).max() <= 2e-3
    used = {name: getattr(e, "_engine", e) for name, e in pipe.engines.items()}
    used = {name: e.from_cache for name, e in used.items() if e is not None and e.from_cache is not None}
    assert set(used) >= {"text_encoder", "unet", "vae_decoder"} and all(used.values()), used  # VAE: weights inside


def _unet_feeds(rec, rng=None) -> dict:
    """One CFG-batch UNet call at 8x8 latents, for the UNet of record ``rec``."""
    rng = rng or np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([10.0, 10.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, rec["inputs"][2]["shape"][-1]), dtype=np.float32)}


def _text_encoder_record(root):
    return json.loads((root / "sdrt.json").read_text())["components"]["text_encoder"]


def test_text_encoder_attention_mask_is_fed_not_folded(sd1_copy):
    # sdrt's text encoders carry the mask as an input with an all-ones default (an initializer of the same name)
    rec = _text_encoder_record(sd1_copy)
    ov, ort = OvEngine("text_encoder", sd1_copy, rec, cache=False), OrtEngine("text_encoder", sd1_copy, rec, cache=False)
    ids = np.random.default_rng(0).integers(0, 600, (2, 77)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, 6:] = 0
    a, b = ov(input_ids=ids, attention_mask=mask), ort(input_ids=ids, attention_mask=mask)
    assert set(a) == set(b)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1e-4


def test_set_weights_replaces_named_weights_as_onnx_runtime_does(sd1_copy):
    rec = json.loads((sd1_copy / "sdrt.json").read_text())["components"]["unet"]
    weights = json.loads((sd1_copy / rec["weights"]).read_text())["weights"]
    entry = weights["conv_in"]
    rng = np.random.default_rng(1)
    new = {entry["initializer"]: rng.standard_normal(entry["shape"]).astype(np.float32)}
    feeds = _unet_feeds(rec, rng)
    ov, ort = OvEngine("unet", sd1_copy, rec, cache=False), OrtEngine("unet", sd1_copy, rec, cache=False)
    before = ov(**feeds)["out_sample"]
    ov.set_weights(new)
    ort.set_weights(new)
    after = ov(**feeds)["out_sample"]
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - ort(**feeds)["out_sample"]).max() <= 1e-4
    ov.set_weights({})
    assert np.abs(ov(**feeds)["out_sample"] - before).max() <= 1e-5


def _resident_bytes(path) -> int:
    """This process's resident bytes of its mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_compiled_models_are_cached_weightless_and_imported_without_the_weights_twice(sd1_copy, monkeypatch):
    """The first engine compiles each shape and caches it weightless; a second imports it (compiling nothing),
    its weights read from the graph's own file, and computes the same. Neither keeps the pages of that file
    it read (the plugin holds its own repacked copy). A damaged cache entry is removed and compiled again."""
    import sys

    rec = json.loads((sd1_copy / "sdrt.json").read_text())["components"]["unet"]
    feeds = _unet_feeds(rec)
    expected = OrtEngine("unet", sd1_copy, rec, cache=False)(**feeds)["out_sample"]
    shutil.rmtree(sd1_copy / "cache", ignore_errors=True)
    weights = (sd1_copy / rec["external_data"]).resolve()

    first = OvEngine("unet", sd1_copy, rec)
    out = [first(**feeds)["out_sample"], first(**feeds)["out_sample"]]
    assert first.from_cache is False
    (blob,) = (sd1_copy / "cache").glob("unet-openvino-*/*.sdrt.blob")
    assert blob.stat().st_size < weights.stat().st_size / 4  # weightless

    second = OvEngine("unet", sd1_copy, rec)
    monkeypatch.setattr(second.core, "compile_model", None, raising=False)  # a hit compiles nothing
    out.append(second(**feeds)["out_sample"])
    assert second.from_cache is True
    for o in out:
        assert np.abs(o - expected).max() <= 1e-4
    if sys.platform.startswith("linux"):
        assert _resident_bytes(weights) == 0

    blob.write_bytes(b"damaged")
    third = OvEngine("unet", sd1_copy, rec)
    assert np.abs(third(**feeds)["out_sample"] - expected).max() <= 1e-4
    assert third.from_cache is False and blob.stat().st_size > len(b"damaged")


def test_the_shape_last_compiled_is_imported_in_the_background_by_the_next_engine(sd1_copy, monkeypatch):
    """An engine made after a shape was compiled imports it in a thread while nothing waits for it; the first
    call at that shape takes it (compiling nothing), a call at another shape drops it and compiles its own
    (remembered next); a damaged memo, set_weights or close leave nothing behind."""
    rec = json.loads((sd1_copy / "sdrt.json").read_text())["components"]["unet"]
    feeds = _unet_feeds(rec)
    expected = OrtEngine("unet", sd1_copy, rec, cache=False)(**feeds)["out_sample"]
    shutil.rmtree(sd1_copy / "cache", ignore_errors=True)
    first = OvEngine("unet", sd1_copy, rec)
    assert first._prefetch is None  # nothing compiled yet
    first(**feeds)
    assert first.cache_state == "filled"
    (memo,) = (sd1_copy / "cache").glob("unet-openvino-*/shape.json")
    assert json.loads(memo.read_text()) == [[n, list(x.shape)] for n, x in feeds.items()]

    second = OvEngine("unet", sd1_copy, rec)
    assert second._prefetch is not None
    monkeypatch.setattr(second.core, "compile_model", None, raising=False)  # taken, not compiled
    assert np.abs(second(**feeds)["out_sample"] - expected).max() <= 1e-4
    assert second._prefetch is None and second.from_cache is True and second.cache_state == "hit"
    monkeypatch.undo()

    other = {**feeds, "sample": feeds["sample"][:, :, :4, :4]}
    third = OvEngine("unet", sd1_copy, rec)
    want = OrtEngine("unet", sd1_copy, rec, cache=False)(**other)["out_sample"]
    assert np.abs(third(**other)["out_sample"] - want).max() <= 1e-4
    assert third._compiled[0] == tuple((n, x.shape) for n, x in other.items()) and third.from_cache is False
    assert json.loads(memo.read_text())[0] == ["sample", [2, 4, 4, 4]]

    fourth = OvEngine("unet", sd1_copy, rec)
    assert fourth._prefetch is not None
    fourth.set_weights({})  # weights set: the prefetched model (the exported weights) is dropped
    assert fourth._prefetch is None and fourth._compiled is None
    fifth = OvEngine("unet", sd1_copy, rec)
    fifth.close()
    assert fifth._prefetch is None

    memo.write_text("{damaged")
    sixth = OvEngine("unet", sd1_copy, rec)
    assert sixth._prefetch is None
    assert np.abs(sixth(**other)["out_sample"] - want).max() <= 1e-4 and sixth.from_cache is True


def test_dropped_pages_are_only_those_of_the_named_files_read_only_mappings(tmp_path):
    """_DroppedPages unmaps pages of read-only mappings of the files it is given, nothing else: a file mapped
    copy-on-write keeps the bytes written to it, and a mapping dropped reads its file's bytes again."""
    import mmap
    import sys

    from sdrt.runtime.backends.openvino import _DroppedPages

    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    data = np.arange(1 << 18, dtype=np.float32)
    named, other = tmp_path / "weights.bin", tmp_path / "other.bin"
    data.tofile(named)
    data.tofile(other)
    with open(named, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with open(named, "r+b") as f:
        cow = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    with open(other, "rb") as f:
        kept = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view, cview, kview = (np.frombuffer(m, np.float32) for m in (ro, cow, kept))
    assert view.sum() == kview.sum() == data.sum()
    cview[:] = -1.0
    with _DroppedPages([named], period=0.01) as dropper:
        assert view.sum() == data.sum()  # read while it drops
    assert dropper.dropped >= data.nbytes
    assert _resident_bytes(named.resolve()) == data.nbytes  # the copy-on-write mapping's pages stay
    assert (cview == -1.0).all() and (view == data).all() and (kview == data).all()
    assert _resident_bytes(other.resolve()) == data.nbytes
    del view, cview, kview
    for m in (ro, cow, kept):
        m.close()


def test_precisions_a_backend_or_cpu_cannot_run_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="ONNX Runtime has no bf16 CPU kernels.*--backend openvino"):
        check("ort-cpu", "bf16")
    with pytest.raises(ConfigError, match="this CPU cannot run bf16 fast"):
        check("openvino", "bf16", flags={"avx2", "fma"})
    check("openvino", "bf16", flags={"avx512f", "avx512_bf16"})
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        check("openvino", "fp8")


def test_int8_without_a_quantized_unet_says_to_run_sdrt_quantize(sd1_copy):
    with pytest.raises(ModelDirError, match=r"has no int8 unet; make one with `sdrt quantize .*` first"):
        Pipeline.load(sd1_copy, backend="openvino", precision="int8")


def test_bf16_rounding_is_to_nearest_even_and_saturates_finite_values():
    from sdrt.runtime.backends.openvino import _bf16_bits

    one, ulp = 1.0, 2.0 ** -7  # bf16 keeps 7 fraction bits
    x = np.array([one, one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2 ** -20, -2.5, 0.0, -0.0,
                  3.4e38, -3.4e38, np.inf, -np.inf, np.nan], np.float32)
    want = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x0000, 0x8000, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0]
    assert _bf16_bits(x).tolist() == want
    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    back = (_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
    assert np.abs(back - w).max() <= np.abs(w).max() * 2.0 ** -8  # half a bf16 ulp at most


def test_bf16_compiles_an_ir_with_bf16_weights_made_once(sd1_copy):
    """The IR is made once, reused bit for bit (and its compiled shapes imported from the cache with their
    weights read from it), made again when damaged; denoisers only, and not under LoRA weights. Engine level,
    so it runs on any CPU: where bf16 is not native OpenVINO computes in f32, from the same bf16 weights."""
    rec = json.loads((sd1_copy / "sdrt.json").read_text())["components"]["unet"]
    feeds = _unet_feeds(rec)
    unet = OvEngine("unet", sd1_copy, rec, precision="bf16")
    first = unet(**feeds)["out_sample"]
    ir = unet._bf16_ir()
    assert ir is not None and ir.is_file() and unet._weights_file == ir.with_suffix(".bin") and not unet.from_cache
    xml = ir.read_text()
    assert 'element_type="bf16"' in xml and 'element_type="f16"' not in xml and "decompression" in xml
    assert not [p for p in ir.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    vae_rec = json.loads((sd1_copy / "sdrt.json").read_text())["components"]["vae_decoder"]
    assert OvEngine("vae_decoder", sd1_copy, vae_rec, precision="bf16")._bf16_ir() is None  # the denoisers only
    # the IR holds every exported weight, in bf16: about half the exported fp32 bytes
    exported = (sd1_copy / rec["external_data"]).stat().st_size
    assert 0.45 * exported < ir.with_suffix(".bin").stat().st_size < 0.55 * exported
    made = ir.stat().st_mtime_ns
    again = OvEngine("unet", sd1_copy, rec, precision="bf16")
    assert np.array_equal(again(**feeds)["out_sample"], first) and ir.stat().st_mtime_ns == made and again.from_cache
    # a damaged IR is made again, not trusted (and the shapes compiled from the old one are compiled again)
    ir.write_text("<net")
    third = OvEngine("unet", sd1_copy, rec, precision="bf16")
    assert np.array_equal(third(**feeds)["out_sample"], first) and "bf16" in ir.read_text() and not third.from_cache
    # LoRA weights are replaced in the exported graph (the IR holds the exported values)
    entry = next(iter(json.loads((sd1_copy / rec["weights"]).read_text())["weights"].values()))
    zeros = np.zeros(entry["shape"], np.float32)
    engine = OvEngine("unet", sd1_copy, rec, precision="bf16", weights={entry["initializer"]: zeros})
    assert engine._bf16_ir() is None


def test_a_compile_is_cached_by_what_is_compiled_not_by_the_precision_asked_for(sd1_copy):
    """int8's text encoder is fp32's compile and its VAE decoder bf16's (fp32's without native bf16): one cache
    entry each, so switching precision compiles only what differs; bf16's UNet (its own IR) has its own."""
    from sdrt.runtime.precision import isa

    comps = json.loads((sd1_copy / "sdrt.json").read_text())["components"]

    def entry(name, precision):
        return OvEngine(name, sd1_copy, comps[name], precision=precision, prefetch=False).cache_dir

    assert entry("text_encoder", "int8") == entry("text_encoder", "fp32") == entry("text_encoder", "bf16")
    assert entry("vae_decoder", "int8") == entry("vae_decoder", "bf16" if isa()["bf16"] else "fp32")
    assert entry("vae_decoder", "bf16") != entry("vae_decoder", "fp32")
    assert len({entry("unet", "bf16"), entry("unet", "fp32"), entry("unet", "int8")}) == 3 - (not isa()["bf16"])


def test_bf16_pipeline_runs_where_the_cpu_has_it(sd1_copy, ort_image):
    from sdrt.runtime.precision import isa

    if not isa()["bf16"]:
        pytest.skip("this CPU has no AVX-512 BF16 or AMX")
    pipe = Pipeline.load(sd1_copy, backend="openvino", precision="bf16")
    image = pipe("a red circle", **CALL).images
    assert pipe.engine("unet")._bf16_ir() is not None
    assert np.isfinite(image).all() and np.abs(image - ort_image).mean() <= 0.05  # bf16: near, not equal


def test_ov_profile_splits_a_call_by_node_type_with_its_arithmetic_rate(sd1_copy):
    from sdrt.benchmarks.ov_profile import profile

    r = profile(str(sd1_copy), "unet", "fp32", 64, 64, runs=1)
    assert r["inputs"]["sample"] == [2, 4, 8, 8] and len(r["runs_s"]) == 1
    assert "Convolution" in r["by_type"] and r["profiled_s"] > 0
    assert r["gflop"] > 0 and r["gflop_per_s"] > 0 and r["conv_gflop_per_s"] > 0
