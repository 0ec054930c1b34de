"""Convolution weights overridden on ONNX Runtime's optimized-graph cache, where its NCHWc pass re-laid them
out under new names (runtime/backends/nchwc.py): the map is found by value, a new weight given in that
layout runs as it would on the exported graph, and a weight found in no form falls back to the exported
graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdrt.runtime.backends.nchwc import RELAID_FILE, external_initializers, reorder  # noqa: E402
from sdrt.runtime.backends.onnxruntime import OrtEngine  # noqa: E402

# conv_in-like (4 input channels: OIHWBo), a 3x3 (OIHWBiBo) and a 1x1 with output channels not a block multiple
SHAPES = {"w_in": (32, 4, 3, 3), "w_mid": (32, 32, 3, 3), "w_out": (20, 32, 1, 1)}


@pytest.fixture
def conv_model(tmp_path):
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s).astype(np.float32) * 0.2 for n, s in SHAPES.items()}
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "w_mid"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w_out"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20, 8, 8])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    comp = tmp_path / "unet"
    comp.mkdir()
    onnx.save_model(model, comp / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    entries = {n: {"initializer": n, "transposed": False, "dtype": "float32", "shape": list(SHAPES[n]),
                   "file": e["file"], "offset": e["offset"], "length": e["length"]}
               for n, e in external_initializers(comp / "model.onnx").items()}
    (comp / "weights.json").write_text(json.dumps({"weights": entries, "unused": [], "unmapped": []}))
    record = {"file": "unet/model.onnx", "external_data": "unet/model.onnx_data", "weights": "unet/weights.json",
              "sha256": "test"}
    return tmp_path, record, weights


def test_the_initializer_reader_agrees_with_onnx(conv_model):
    model_dir, record, weights = conv_model
    found = external_initializers(model_dir / record["file"])
    assert sorted(found) == sorted(SHAPES)
    for name, e in found.items():
        data = np.fromfile(model_dir / "unet" / e["file"], dtype=e["dtype"], count=int(np.prod(e["dims"])),
                           offset=e["offset"]).reshape(e["dims"])
        np.testing.assert_array_equal(data, weights[name])


def test_reorder_is_mlas_blocked_layout():
    w = np.arange(3 * 2 * 1 * 1, dtype=np.float32).reshape(3, 2, 1, 1) + 1
    r = reorder(w, "OIHWBiBo", 4)  # padded to (4, 4, 1, 1): [ob][ib][kh][kw][bi][bo]
    assert r.shape == (4, 4, 1, 1)
    flat = r.ravel()
    for o in range(4):
        for i in range(4):
            assert flat[i * 4 + o] == (w[o, i, 0, 0] if o < 3 and i < 2 else 0)
    r = reorder(w, "OIHWBo", 4)  # (4, 2, 1, 1): [ob][i][kh][kw][bo]
    assert r.shape == (4, 2, 1, 1) and r.ravel()[1 * 4 + 2] == w[2, 1, 0, 0]


def test_new_convolution_weights_run_on_the_cached_graph(conv_model):
    model_dir, record, weights = conv_model
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = OrtEngine("unet", model_dir, record, threads=1)  # fills the cache
    assert first.source == "graph"
    base = first(x=x)["y"]
    entry = next((model_dir / "cache").glob("unet-cpu-*"))
    relaid = json.loads((entry / RELAID_FILE).read_text())
    if not relaid["relaid"]:
        pytest.skip("ONNX Runtime's NCHWc pass did not re-lay out the convolutions on this CPU")
    assert relaid["absent"] == [] and set(relaid["relaid"]) == set(SHAPES)
    assert all(r["name"] not in SHAPES for r in relaid["relaid"].values())

    engine = OrtEngine("unet", model_dir, record, threads=1)
    assert engine.source == "cache"
    np.testing.assert_array_equal(engine(x=x)["y"], base)
    rng = np.random.default_rng(2)
    new = {n: (w + rng.standard_normal(w.shape).astype(np.float32) * 0.1) for n, w in weights.items() if n != "w_in"}
    engine.set_weights({"w_mid": new["w_mid"], "w_out": lambda: new["w_out"]})
    assert engine.source == "cache"
    got = engine(x=x)["y"]
    expected = OrtEngine("unet", model_dir, record, threads=1, cache=False, weights=new)(x=x)["y"]
    assert float(np.abs(got - base).max()) > 1e-2  # the new weights act
    np.testing.assert_allclose(got, expected, atol=1e-5)
    engine.set_weights({})
    np.testing.assert_array_equal(engine(x=x)["y"], base)

    # a weight the map says the cached graph lost: the exported graph, with every pass
    (entry / RELAID_FILE).write_text(json.dumps({**relaid, "relaid": {}, "absent": ["w_mid"]}))
    engine.set_weights({"w_mid": new["w_mid"]})
    assert engine.source == "graph"
    only_mid = OrtEngine("unet", model_dir, record, threads=1, cache=False, weights={"w_mid": new["w_mid"]})(x=x)["y"]
    np.testing.assert_allclose(engine(x=x)["y"], only_mid, atol=1e-5)


def test_a_cache_entry_without_a_map_gets_one(conv_model):
    model_dir, record, _ = conv_model
    OrtEngine("unet", model_dir, record, threads=1)
    entry = next((model_dir / "cache").glob("unet-cpu-*"))
    (entry / RELAID_FILE).unlink()  # as entries made before sdrt kept one
    engine = OrtEngine("unet", model_dir, record, threads=1)
    engine.set_weights({"w_mid": np.zeros(SHAPES["w_mid"], np.float32)})
    assert engine.source == "cache" and (entry / RELAID_FILE).is_file()


class _Maker:
    """A weight made into the buffer the engine gives, as runtime.lora.Merged is."""

    def __init__(self, value):
        self.value, self.shape, self.dtype, self.calls = value, value.shape, value.dtype, []

    def __call__(self, out=None):
        self.calls.append(out is not None)
        if out is None:
            return self.value.copy()
        out[...] = self.value
        return out


def test_prepacked_weights_are_handed_over_by_address_and_their_pages_given_back(tmp_path):
    """On the cached graph a new MatMul weight is read by ONNX Runtime once, into its packed copy, while the
    session is made: sdrt's buffer is then handed back to the OS, and the session still computes with the new
    weight. A weight with another use too is kept, and read in place."""
    rng = np.random.default_rng(0)
    # over 1 KiB each, so that the cached graph keeps them in its external data
    shapes = {"w1": (32, 64), "bias": (4, 64), "w2": (64, 16), "w3": (32, 64)}
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "bias"], ["b"]),
             helper.make_node("MatMul", ["x", "w3"], ["c"]), helper.make_node("Add", ["b", "c"], ["d"]),
             helper.make_node("Relu", ["d"], ["e"]), helper.make_node("MatMul", ["e", "w2"], ["y"]),
             helper.make_node("MatMul", ["w3", "x2"], ["z"])]  # w3 is an A input here too: not packed
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32]),
                                                 helper.make_tensor_value_info("x2", TensorProto.FLOAT, [64, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [32, 3])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    comp = tmp_path / "unet"
    comp.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), comp / "model.onnx",
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    entries = {n: {"initializer": n, "transposed": False, "dtype": "float32", "shape": list(weights[n].shape),
                   "file": e["file"], "offset": e["offset"], "length": e["length"]}
               for n, e in external_initializers(comp / "model.onnx").items()}
    (comp / "weights.json").write_text(json.dumps({"weights": entries, "unused": [], "unmapped": []}))
    record = {"file": "unet/model.onnx", "external_data": "unet/model.onnx_data", "weights": "unet/weights.json",
              "sha256": "test"}
    feed = {"x": rng.standard_normal((4, 32)).astype(np.float32), "x2": rng.standard_normal((64, 3)).astype(np.float32)}
    OrtEngine("unet", tmp_path, record, threads=1)  # fills the cache
    entry = next((tmp_path / "cache").glob("unet-cpu-*"))
    assert json.loads((entry / RELAID_FILE).read_text())["prepacked"] == ["w1", "w2"]

    new = {n: w + np.float32(0.5) for n, w in weights.items()}
    makers = {n: _Maker(w) for n, w in new.items()}
    engine = OrtEngine("unet", tmp_path, record, threads=1)
    engine.set_weights(makers)
    assert engine.source == "cache"
    assert [makers[n].calls for n in shapes] == [[True], [False], [True], [False]]
    released = engine._shared.maps
    assert len(released) == 2 and all(not np.frombuffer(m, np.uint8).any() for m in released)  # read as zeros now
    expected = OrtEngine("unet", tmp_path, record, threads=1, cache=False, weights=new)(**feed)
    got = engine(**feed)
    for name in ("y", "z"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert float(np.abs(got["y"] - OrtEngine("unet", tmp_path, record, threads=1)(**feed)["y"]).max()) > 1e-2
