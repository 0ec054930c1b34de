"""The low-memory export path (issue 19), on the small models: a checkpoint's weights stay on disk until
their component is exported and are freed before its graph is saved and validated; the graph's weights are
read and written one at a time, never all in the ModelProto at once; fp16 is converted as they stream by,
to the same values ONNX Runtime's converter gives in memory. The real sizes (sdxl-full, sd1-full) are
measured, not tested: README's benchmark section."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")


def _in_memory(ckpt) -> set[str]:
    """The checkpoint's modules whose weights are loaded (not on the meta device)."""
    return {n for n in MODULES if getattr(ckpt, n) is not None
            and any(p.device.type != "meta" for p in getattr(ckpt, n).parameters())}


def test_one_component_in_memory_at_a_time_and_none_while_saving(checkpoint, tmp_path, monkeypatch):
    import onnx

    from sdrt.export import exporter, onnx_graph, validate

    opened = []
    load = exporter.load_checkpoint
    monkeypatch.setattr(exporter, "load_checkpoint", lambda *a, **k: opened.append(load(*a, **k)) or opened[-1])
    seen = {}
    export_graph = onnx_graph.export_graph

    def watched(comp, dest, *a, release, **k):
        ckpt = opened[0]
        seen[comp.name] = [_in_memory(ckpt)]

        def release_and_look():
            release()
            seen[comp.name].append(_in_memory(ckpt))

        return export_graph(comp, dest, *a, release=release_and_look, **k)

    monkeypatch.setattr(onnx_graph, "export_graph", watched)

    def refuse(*a, **k):
        raise AssertionError("the export loaded every weight of a graph into its ModelProto")

    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(validate, "LARGE_BYTES", 0)  # every component "large": validated at its cheapest shape
    m = exporter.export_model(checkpoint("sdxl"), tmp_path / "out", log=lambda *_: None)

    assert _in_memory(opened[0]) == set(), "the checkpoint's weights were freed after the export"
    assert seen == {"text_encoder": [{"text_encoder"}, set()], "text_encoder_2": [{"text_encoder_2"}, set()],
                    "unet": [{"unet"}, set()], "vae_decoder": [{"vae"}, set()], "vae_encoder": [{"vae"}, set()]}
    for name, rec in m["components"].items():
        assert len(rec["validation"]["shapes"]) == 1, name
        assert rec["validation"]["max_rel_error"] <= 1e-3, name
    unet = m["components"]["unet"]["validation"]["shapes"][0]["sample"]
    assert unet[0] == 1 and unet[2] < 16, "the UNet's cheapest shape (batch 1, below its native 16x16 latents)"


def test_exported_graphs_hold_no_transpose_of_a_weight(model_dir):
    import json

    import onnx

    root = model_dir("sd1")
    for name, rec in json.loads((root / "sdrt.json").read_text())["components"].items():
        graph = onnx.load(str(root / rec["file"]), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights], name


def test_streamed_fp16_equals_onnxruntimes_converter_in_memory(model_dir, tmp_path, checkpoint):
    """The fp16 export retypes the weights on disk and converts them as it streams them into the final file;
    ONNX Runtime's converter run on the whole fp32 graph in memory gives the same graph and the same values."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from sdrt.export.exporter import export_model

    fp32 = model_dir("sd1")
    fp16 = tmp_path / "fp16"
    export_model(checkpoint("sd1"), fp16, fp16=True, log=lambda *_: None)
    for comp in ("unet", "text_encoder"):  # the unet's weights are external (LoRA), the text encoder's embedded
        theirs = convert_float_to_float16(onnx.load(str(fp32 / comp / "model.onnx")), keep_io_types=True)
        ours = onnx.load(str(fp16 / comp / "model.onnx"))
        assert sorted(n.op_type for n in ours.graph.node) == sorted(n.op_type for n in theirs.graph.node), comp
        expected = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
        got = {t.name: numpy_helper.to_array(t, base_dir=str(fp16 / comp)) for t in ours.graph.initializer}
        assert got.keys() == expected.keys(), comp
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), (comp, name)


def _model(tmp_path, arrays: dict[str, np.ndarray], on_disk: set[str]):
    """A graph adding its initializers' sums, those in ``on_disk`` written to files of their own."""
    import onnx
    from onnx import helper

    from sdrt.export import external

    inits = [external.tensor(n, a, tmp_path / f"{n}.bin", tmp_path) if n in on_disk else
             onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()]
    nodes = [helper.make_node("ReduceSum", [n], [f"{n}_sum"], keepdims=0) for n in arrays]
    nodes.append(helper.make_node("Sum", [f"{n}_sum" for n in arrays], ["y"]))
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [True, False])
def test_save_streams_each_tensor_to_its_place(tmp_path, external):
    import onnx
    from onnx import numpy_helper

    from sdrt.export import external as ext

    rng = np.random.default_rng(0)
    arrays = {"big": rng.standard_normal((600, 600), np.float32),  # 1.4 MB: at an aligned offset
              "mid": rng.standard_normal((40, 40), np.float32), "tiny": np.arange(3, dtype=np.float32),
              "half": rng.standard_normal((50, 50), np.float32), "more": rng.standard_normal((700, 500), np.float32)}
    src = tmp_path / "src"
    src.mkdir()
    model = _model(src, arrays, on_disk={"big", "half", "more"})
    out = tmp_path / "out"
    out.mkdir()
    convert = {"half": (np.float32, lambda a: a.astype(np.float16))}
    model.graph.initializer[3].data_type = onnx.TensorProto.FLOAT16  # "half": retyped, its bytes still fp32
    ext.save(model, out / "model.onnx", src, "model.onnx_data", external, convert, consume=True)

    assert not list(src.glob("*.bin")), "the sources were consumed"
    saved = onnx.load(str(out / "model.onnx"))
    for t in saved.graph.initializer:
        want = arrays[t.name].astype(np.float16) if t.name == "half" else arrays[t.name]
        assert np.array_equal(numpy_helper.to_array(t), want), t.name
    records = {t.name: ext.info(onnx.TensorProto.FromString(t.SerializeToString())) for t in
               onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer if ext.is_external(t)}
    if external:
        assert set(records) == {"big", "mid", "half", "more"}  # "tiny" (12 bytes) stays inside
        for name in ("big", "more"):
            assert int(records[name]["offset"]) % ext.ALIGN == 0, name
    else:
        assert records == {} and not (out / "model.onnx_data").exists()
