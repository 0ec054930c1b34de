"""TensorRT refit (engines from `sdrt build --refittable`): TrtEngine.set_weights against a stand-in
for the tensorrt module, so it runs without TensorRT or a GPU. What the stand-in checks is what
TensorRT's documentation asks: trt.Refitter(engine, logger), set_named_weights(name, trt.Weights(a))
with arrays of the prototype's type and count that stay alive until refit_cuda_engine returns,
get_missing_weights for weights fused with the given ones, no enqueued work during the refit."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from sdrt.runtime.backends.tensorrt import RefitError, TrtEngine
from sdrt.runtime.engines import EngineMismatch
from sdrt.runtime.errors import SdrtError

_NP = {"FLOAT": np.float32, "HALF": np.float16}


def _nptype(dtype):
    if dtype not in _NP:
        raise TypeError(f"cannot map {dtype} to numpy")
    return _NP[dtype]


class FakeWeights:
    def __init__(self, a):
        assert isinstance(a, np.ndarray) and a.flags.c_contiguous
        self.array = a


class FakeRefitter:
    def __init__(self, engine, logger):
        assert logger == "logger"
        self.engine, self.staged, self.refits = engine, {}, 0
        engine.refitters.append(self)

    def get_all_weights(self):
        return list(self.engine.weights)

    def get_weights_prototype(self, name):
        dtype, size = self.engine.weights.get(name, ("FLOAT", -1))
        return NS(dtype=dtype, size=size)

    def set_named_weights(self, name, w):
        assert isinstance(w, FakeWeights)
        dtype, size = self.engine.weights[name]
        if name in self.engine.refuse or w.array.dtype != _NP[dtype] or w.array.size != size:
            return False
        self.staged[name] = w
        return True

    def get_missing_weights(self):
        return [p for n in self.staged for p in self.engine.fused.get(n, ()) if p not in self.staged]

    def refit_cuda_engine(self):
        assert self.engine.session.in_flight == 0, "refit with enqueued work"
        self.refits += 1
        if self.engine.fail_refit or self.get_missing_weights():
            return False
        for name, w in self.staged.items():  # reads the host arrays now: they must still be there
            self.engine.values[name] = w.array.copy()
        return True


class FakeEngine:
    num_io_tensors = 0
    device_memory_size_v2 = 0

    def __init__(self, weights, refittable=True):
        self.weights, self.refittable = weights, refittable  # name -> (TensorRT dtype, count)
        self.values, self.refitters, self.fused, self.refuse, self.fail_refit = {}, [], {}, set(), False

    def create_execution_context(self, strategy):
        return NS(set_device_memory=lambda *a: None)


class FakeSession:
    def __init__(self, engine):
        self.trt = NS(Refitter=FakeRefitter, Weights=FakeWeights, nptype=_nptype,
                      TensorIOMode=NS(INPUT=0), ExecutionContextAllocationStrategy=NS(USER_MANAGED=1))
        self.logger, self.in_flight, self.destroyed = "logger", 1, []
        self.runtime = NS(deserialize_cuda_engine=lambda data: engine)
        self.cudart = NS(cudaGraphExecDestroy=self.destroyed.append, cudaGraphDestroy=self.destroyed.append)
        engine.session = self

    def attach(self, context, need):
        pass

    def synchronize(self):
        self.in_flight = 0


WEIGHTS = {"unet.down.0.to_q.weight": ("HALF", 12), "onnx::MatMul_77": ("FLOAT", 6), "unet.conv_in.bias": ("FLOAT", 4),
           "w3": ("FLOAT", 1), "w4": ("FLOAT", 1), "w5": ("FLOAT", 1), "w6": ("FLOAT", 1)}


@pytest.fixture
def make_engine(tmp_path):
    def make(weights=WEIGHTS, refittable=True, cuda_graph=False):
        plan = tmp_path / "engines" / "k" / "unet.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(b"plan")
        fake = FakeEngine(dict(weights), refittable)
        session = FakeSession(fake)
        eng = TrtEngine("unet", tmp_path, {"file": "engines/k/unet.plan", "profile": {}}, {"inputs": []}, session,
                        cuda_graph=cuda_graph)
        return eng, fake

    return make


def test_set_weights_refits_exactly_the_named_weights(make_engine):
    eng, fake = make_engine()
    q = np.arange(12, dtype=np.float32).reshape(4, 3)
    m = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not contiguous: copied for TensorRT
    eng.set_weights({"unet.down.0.to_q.weight": q, "onnx::MatMul_77": m})
    (r,) = fake.refitters
    assert set(r.staged) == {"unet.down.0.to_q.weight", "onnx::MatMul_77"} and r.refits == 1
    assert fake.values["unet.down.0.to_q.weight"].dtype == np.float16  # cast to the engine's weight type
    np.testing.assert_array_equal(fake.values["unet.down.0.to_q.weight"], q)
    np.testing.assert_array_equal(fake.values["onnx::MatMul_77"], m)
    assert set(fake.values) == {"unet.down.0.to_q.weight", "onnx::MatMul_77"}
    exported = {"unet.down.0.to_q.weight": np.zeros((4, 3), np.float32), "onnx::MatMul_77": np.zeros((3, 2), np.float32)}
    eng._exported = exported.__getitem__  # the weight map's read of the exported value
    eng.set_weights({"onnx::MatMul_77": lambda: m})  # to_q no longer given: its exported value back
    np.testing.assert_array_equal(fake.values["unet.down.0.to_q.weight"], exported["unet.down.0.to_q.weight"])
    assert len(fake.refitters) == 2
    eng.set_weights({})  # MatMul_77 back too
    assert len(fake.refitters) == 3
    np.testing.assert_array_equal(fake.values["onnx::MatMul_77"], exported["onnx::MatMul_77"])
    eng.set_weights({})  # nothing to do: no refitter
    assert len(fake.refitters) == 3


def test_weight_names_lists_the_refittable_weights_once(make_engine):
    eng, fake = make_engine()
    assert eng.refittable and eng.weight_names() == list(WEIGHTS)
    eng.weight_names()
    assert len(fake.refitters) == 1


def test_refit_drops_the_captured_cuda_graph(make_engine):
    eng, fake = make_engine(cuda_graph=True)
    eng._graph, eng._graph_exec, eng._graph_key = "graph", "exec", ("shapes",)
    eng.set_weights({"unet.conv_in.bias": np.ones(4, np.float32)})
    assert eng._graph is eng._graph_exec is eng._graph_key is None
    assert fake.session.destroyed == ["exec", "graph"] and eng.cuda_graph  # recaptured on the next call


def test_not_refittable_says_how_to_rebuild(make_engine, tmp_path):
    eng, fake = make_engine(refittable=False)
    with pytest.raises(RefitError) as e:
        eng.set_weights({"unet.conv_in.bias": np.ones(4, np.float32)})
    assert f"sdrt build {tmp_path} --components unet --refittable" in str(e.value) and "not refittable" in str(e.value)
    assert isinstance(e.value, (EngineMismatch, RuntimeError, SdrtError))
    with pytest.raises(RefitError, match="not refittable"):
        eng.weight_names()
    assert fake.refitters == []


def test_unknown_names_are_named_before_anything_is_set(make_engine):
    eng, fake = make_engine()
    bad = {f"lora_unet_x{i}": np.ones(1, np.float32) for i in range(7)}
    with pytest.raises(RefitError, match=r"no refittable weight\(s\) lora_unet_x0, .*lora_unet_x4 and 2 more"):
        eng.set_weights({"unet.conv_in.bias": np.ones(4, np.float32), **bad})
    assert fake.refitters[-1].staged == {} and fake.values == {}


@pytest.mark.parametrize(
    "value, match",
    [
        (np.ones((2, 3), np.float32), r"unet.conv_in.bias: 6 values \(shape \(2, 3\)\) given, the engine's has 4"),
        (np.ones(4, np.int64), "int64 given, the engine's is float32"),
    ],
)
def test_wrong_size_or_type_is_refused_before_refitting(make_engine, value, match):
    eng, fake = make_engine()
    with pytest.raises(RefitError, match=match):
        eng.set_weights({"onnx::MatMul_77": np.ones(6, np.float32), "unet.conv_in.bias": value})
    assert fake.refitters[-1].staged == {} and fake.refitters[-1].refits == 0


def test_unsupported_engine_weight_type(make_engine):
    eng, _ = make_engine(weights={"w": ("BF16", 2)})
    with pytest.raises(RefitError, match="weight w is BF16"):
        eng.set_weights({"w": np.ones(2, np.float32)})


def test_fused_weights_must_come_together(make_engine):
    eng, fake = make_engine()
    fake.fused = {"onnx::MatMul_77": ["unet.conv_in.bias", "w3"]}
    with pytest.raises(RefitError, match=r"needs weight\(s\) unet.conv_in.bias, w3 together") as e:
        eng.set_weights({"onnx::MatMul_77": np.ones(6, np.float32)})
    assert e.value.missing == ["unet.conv_in.bias", "w3"] and fake.refitters[-1].refits == 0 and fake.values == {}
    eng.set_weights({"onnx::MatMul_77": np.ones(6, np.float32), "unet.conv_in.bias": np.ones(4, np.float32),
                     "w3": np.ones(1, np.float32)})
    assert set(fake.values) == {"onnx::MatMul_77", "unet.conv_in.bias", "w3"}


def test_refit_failure_and_refused_weights(make_engine):
    eng, fake = make_engine()
    fake.fail_refit = True
    with pytest.raises(RefitError, match="could not refit the unet engine .see TensorRT's log above."):
        eng.set_weights({"unet.conv_in.bias": np.ones(4, np.float32)})
    assert fake.refitters[-1].refits == 1
    fake.fail_refit, fake.refuse = False, {"unet.conv_in.bias"}
    with pytest.raises(RefitError, match="TensorRT refused unet weight unet.conv_in.bias"):
        eng.set_weights({"unet.conv_in.bias": np.ones(4, np.float32)})
