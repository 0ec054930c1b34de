"""A damaged or hostile model directory fails safely: one ModelDirError naming the file and what to do
(exit code 1 and one line from the CLI), never a traceback, and nothing opened that the manifest points
at outside the directory. Plus ``sdrt info --verify``, the TensorRT plans' sha256 and ``from sdrt import Pipeline``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from sdrt.cli import main
from sdrt.runtime.errors import ModelDirError
from sdrt.runtime.manifest import load_manifest

REEXPORT = r"re-export the model with `sdrt export --overwrite`"


@pytest.fixture
def copy(model_dir, tmp_path):
    """copy(family="sd1") -> a fresh copy of the exported model directory (without its graph cache)."""

    def make(family="sd1"):
        root = tmp_path / family
        shutil.copytree(model_dir(family), root, ignore=shutil.ignore_patterns("cache"))
        return root

    return make


def _edit(root: Path, change) -> Path:
    m = json.loads((root / "sdrt.json").read_text())
    m = change(m) or m
    (root / "sdrt.json").write_text(json.dumps(m))
    return root


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


# -- damaged files ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not an ONNX graph" * 100, lambda b: b""],
                         ids=["truncated", "garbage", "empty"])
def test_a_damaged_onnx_graph_is_named_with_re_export(copy, damage):
    from sdrt.runtime.pipeline import Pipeline

    root = copy()
    graph = root / "unet/model.onnx"
    graph.write_bytes(damage(graph.read_bytes()))
    with pytest.raises(ModelDirError, match=rf"unet/model.onnx is damaged: ONNX Runtime cannot load it .*{REEXPORT}"):
        Pipeline.load(root, backend="ort-cpu", threads=1)


def test_the_graph_cache_neither_hides_nor_keeps_a_damaged_graph(copy, capsys):
    from sdrt.runtime.pipeline import Pipeline

    root = copy()
    Pipeline.load(root, backend="ort-cpu", threads=1)  # fills the cache from the intact graphs
    cached = sorted(p.name for p in (root / "cache").iterdir())
    assert any(n.startswith("vae_decoder-") for n in cached)
    graph = root / "vae_decoder/model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ModelDirError, match="vae_decoder/model.onnx is damaged"):
        Pipeline.load(root, backend="ort-cpu", threads=1)
    assert sorted(p.name for p in (root / "cache").iterdir()) == cached  # no entry (or leftover) for it
    err = _one_line_error(capsys, ["generate", "x", "--model", str(root), "--backend", "ort-cpu", "--quiet"])
    assert "vae_decoder/model.onnx is damaged" in err


def test_a_corrupt_tokenizer_is_named_with_re_export(copy, capsys):
    from sdrt.runtime.pipeline import Pipeline

    root = copy()
    (root / "tokenizer/tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ModelDirError, match=rf"tokenizer/tokenizer.json is damaged: .*{REEXPORT}"):
        Pipeline.load(root, backend="ort-cpu", threads=1)
    _one_line_error(capsys, ["generate", "x", "--model", str(root), "--backend", "ort-cpu", "--quiet"])


# -- paths out of the directory ---------------------------------------------------------------


def _set(path: str, value):
    """A manifest edit setting the key at dotted ``path`` (list indices as numbers)."""

    def change(m):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        obj = m
        for k in parents:
            obj = obj.setdefault(k, {}) if isinstance(obj, dict) else obj[k]
        obj[last] = value

    return change


@pytest.mark.parametrize("key", ["components.unet.file", "components.unet.external_data", "components.unet.weights",
                                 "tokenizers.0.file", "engines.gpu.components.unet.file"])
@pytest.mark.parametrize("outside", ["../../../etc/passwd", "/etc/passwd", "unet/../../x", "..\\..\\x", "C:x"])
def test_a_file_outside_the_directory_is_refused_before_anything_opens(copy, monkeypatch, key, outside):
    from sdrt.runtime import pipeline

    root = _edit(copy(), _set(key, outside))
    monkeypatch.setattr(pipeline, "select", lambda *a, **k: pytest.fail("an engine was opened"))
    shown = re.escape(key.replace(".0.", "[0]."))
    with pytest.raises(ModelDirError, match=rf"sdrt.json: {shown} '.*' is not a path inside the model directory"):
        pipeline.Pipeline.load(root)


def test_a_hostile_manifest_is_one_line_from_the_cli(copy, capsys):
    root = _edit(copy(), _set("components.text_encoder.file", "/etc/passwd"))
    for argv in (["info", str(root)], ["info", "--verify", str(root)], ["build", str(root)],
                 ["generate", "x", "--model", str(root), "--quiet"]):
        assert "is not a path inside the model directory" in _one_line_error(capsys, argv)


# -- the manifest's schema --------------------------------------------------------------------


def _drop(path: str):
    def change(m):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        obj = m
        for k in parents:
            obj = obj[k]
        del obj[last]

    return change


@pytest.mark.parametrize("change, message", [
    (_drop("components.unet.inputs"), "components.unet.inputs is missing"),
    (_drop("components.unet"), "components.unet is missing"),
    (_drop("components.vae_decoder.outputs.0.name"), r"components.vae_decoder.outputs\[0\].name is missing"),
    (_drop("tokenizers.0.max_length"), r"tokenizers\[0\].max_length is missing"),
    (_drop("latent_channels"), "latent_channels is missing"),
    (_drop("family"), "family is missing"),
    (_set("latent_channels", "4"), "latent_channels must be an integer, got '4'"),
    (_set("native_resolution", True), "native_resolution must be an integer, got True"),
    (_set("vae_scaling_factor", None), "vae_scaling_factor must be a number, got None"),
    (_set("components", []), r"components must be an object, got \[\]"),
    (_set("components.unet.inputs", []), "components.unet.inputs is empty"),
    (_set("components.unet.inputs.0.shape", ["batch", 4.5]), r"components.unet.inputs\[0\].shape must list integers"),
    (_set("components.unet.sha256", 7), "components.unet.sha256 must be a string or null, got 7"),
    (_set("tokenizers", {"file": "x"}), "tokenizers must be a list"),
    (_set("engines.gpu", "x"), "engines.gpu must be an object"),
    (_set("task", "video"), "task 'video' is not text-to-image or inpainting"),
])
def test_a_malformed_manifest_names_the_key(copy, change, message):
    root = _edit(copy(), change)
    with pytest.raises(ModelDirError, match=rf"sdrt.json: {message}.*{REEXPORT}"):
        load_manifest(root)


def test_an_unknown_family_or_a_manifest_that_is_no_object_is_refused(copy):
    root = _edit(copy(), _set("family", "sd9"))
    with pytest.raises(ModelDirError, match=r"sdrt.json: family 'sd9' is not one this sdrt runs \(sd1, sd2, sdxl, sdxl-refiner\); upgrade"):
        load_manifest(root)
    (root / "sdrt.json").write_text("[1, 2]")
    with pytest.raises(ModelDirError, match=rf"sdrt.json is not a JSON object; {REEXPORT}"):
        load_manifest(root)


def test_a_later_sdrts_keys_and_an_older_manifests_absent_ones_load(copy):
    from sdrt.runtime.default_model import DEFAULT_MODEL_DIR
    from sdrt.runtime.pipeline import Pipeline

    def older_and_newer(m):
        for key in ("task", "unet_in_channels", "generation_defaults", "engines", "vae_shift_factor", "prediction_type",
                    "sdrt_version", "scheduler_class", "source"):
            m.pop(key, None)
        m["format_version"] = 1
        m["a_later_key"] = {"anything": [1]}
        m["components"]["unet"]["a_later_key"] = 1
        m["tokenizers"][0]["a_later_key"] = None

    root = _edit(copy(), older_and_newer)
    assert load_manifest(root)["a_later_key"] == {"anything": [1]}
    Pipeline.load(root, backend="ort-cpu", threads=1)
    assert main(["info", str(root)]) == 0
    assert load_manifest(DEFAULT_MODEL_DIR)["family"] == "sd1"  # the built-in model


# -- sdrt info --verify and the TensorRT plans' sha256 ---------------------------------------


def test_info_verify_checks_every_recorded_sha256(copy, capsys):
    root = copy()
    assert main(["info", "--verify", str(root)]) == 0
    assert "all" in capsys.readouterr().out
    graph = root / "vae_decoder/model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    (root / "text_encoder/model.onnx").unlink()
    assert main(["info", "--verify", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "mismatch: vae_decoder/model.onnx: sha256" in out and "mismatch: text_encoder/model.onnx: missing" in out
    assert len(err.strip().splitlines()) == 1 and "2 of" in err and "sdrt export --overwrite" in err


class _Builder:
    """Stands in for TensorRTBuilder (as test_tensorrt's FakeBuilder): a deterministic 'plan' per component."""

    def __init__(self):
        from sdrt.runtime.engines import DeviceFacts

        self.facts, self.has_fp16_flag = DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43"), True

    def build(self, onnx_path, profile, plan, **kw):
        return b"plan of " + Path(onnx_path).parent.name.encode(), None


def _open_plan(root: Path, record: dict):
    """TrtEngine on a stand-in TensorRT session; returns what was given to deserialize_cuda_engine."""
    from sdrt.runtime.backends.tensorrt import TrtEngine

    given = []
    engine = NS(num_io_tensors=0, device_memory_size_v2=0, create_execution_context=lambda strategy: NS())
    session = NS(trt=NS(TensorIOMode=NS(INPUT=0), ExecutionContextAllocationStrategy=NS(USER_MANAGED=1)),
                 runtime=NS(deserialize_cuda_engine=lambda data: given.append(data) or engine),
                 attach=lambda context, need: None)
    TrtEngine("unet", root, record, {"inputs": []}, session)
    return given


def test_build_records_each_plans_sha256_and_the_backend_checks_it(copy, capsys):
    from sdrt.export.build import build_engines

    root = copy()
    build_engines(root, components=["unet"], builder=_Builder(), log=lambda *_: None)
    (entry,) = load_manifest(root)["engines"].values()
    rec = entry["components"]["unet"]
    plan = root / rec["file"]
    assert rec["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert _open_plan(root, rec) == [plan.read_bytes()]
    assert main(["info", "--verify", str(root)]) == 0

    plan.write_bytes(b"plan of something else")
    with pytest.raises(ModelDirError, match=r"unet.plan does not match the sha256 `sdrt build` recorded .*"
                                            r"sdrt build .* --components unet --force"):
        _open_plan(root, rec)  # refused before TensorRT sees it
    assert _open_plan(root, {k: v for k, v in rec.items() if k != "sha256"})  # an older build's record: accepted
    capsys.readouterr()
    assert main(["info", "--verify", str(root)]) == 1
    assert "mismatch: engines/" in capsys.readouterr().out


# -- the front door ---------------------------------------------------------------------------


def test_from_sdrt_import_pipeline_and_import_sdrt_stays_light(tmp_path):
    code = (
        "import sys, sdrt;"
        "assert 'onnxruntime' not in sys.modules and 'sdrt.runtime' not in sys.modules, 'import sdrt is heavy';"
        "from sdrt import Pipeline; from sdrt.runtime.pipeline import Pipeline as P;"
        "assert Pipeline is P and 'Pipeline' in sdrt.__all__;"
        "import pytest;"
        "pytest.raises(AttributeError, lambda: sdrt.Nope)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
