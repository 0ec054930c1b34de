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
    (entry / RELAID_FILE).write_text(json.dumps({"relaid": {}, "absent": ["w_mid"]}))
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
