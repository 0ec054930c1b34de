"""sdrt export: each family exports, validates against PyTorch, and writes the model directory
DESIGN.md describes; bad input gets a one-line error; an interrupted export destroys nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import INPAINT_FAMILIES, SMALL_FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _manifest(path: Path) -> dict:
    return json.loads((path / "sdrt.json").read_text())


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_each_family_exports_and_validates_against_pytorch(model_dir, family):
    m = _manifest(model_dir(family))
    expected = {"text_encoder", "unet", "vae_decoder", "vae_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert set(m["components"]) == expected
    for name, rec in m["components"].items():
        val = rec["validation"]
        assert val["max_rel_error"] <= 1e-3, name
        assert len(val["shapes"]) == 2 and val["shapes"][0] != val["shapes"][1], "validated at two shapes"


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_graphs_load_in_onnxruntime_with_named_dynamic_axes(model_dir, family):
    import onnx
    import onnxruntime as ort

    root = model_dir(family)
    m = _manifest(root)
    for name, rec in m["components"].items():
        model = onnx.load(str(root / rec["file"]), load_external_data=False)
        assert model.opset_import[0].version >= 17
        sess = ort.InferenceSession(str(root / rec["file"]), providers=["CPUExecutionProvider"])
        # inputs with a default (the text encoders' attention_mask: all ones when left out, as optimum calls them)
        # are initializers ONNX Runtime lists apart, as overridable
        graph_inputs = sess.get_inputs() + [i for i in sess.get_overridable_initializers()
                                            if i.name in {t["name"] for t in rec["inputs"]}]
        assert [i.name for i in graph_inputs] == [t["name"] for t in rec["inputs"]]
        # the record lists the outputs sdrt reads, in binding order; SDXL's text encoders have more (optimum's set)
        assert {t["name"] for t in rec["outputs"]} <= {o.name for o in sess.get_outputs()}
        for graph_in, spec in zip(sess.get_inputs(), rec["inputs"]):
            assert list(graph_in.shape) == spec["shape"], (name, graph_in.name)


def test_unet_graph_runs_at_a_shape_it_was_not_traced_at(model_dir):
    import onnxruntime as ort

    root = model_dir("sd1")
    sess = ort.InferenceSession(str(root / "unet/model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {
        "sample": np.zeros((3, 4, 6, 10), np.float32),
        "timestep": np.full((3,), 10.0, np.float32),
        "encoder_hidden_states": np.zeros((3, 77, 32), np.float32),
    })[0]
    assert out.shape == (3, 4, 6, 10)


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_manifest_records_the_model_facts(model_dir, checkpoint, family):
    from sdrt.runtime.files import sha256_file
    from sdrt.runtime.manifest import FORMAT_VERSION

    root, ckpt = model_dir(family), checkpoint(family)
    m = _manifest(root)
    vae_cfg = json.loads((ckpt / "vae/config.json").read_text())
    unet_cfg = json.loads((ckpt / "unet/config.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["family"] == family
    assert m["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert m["latent_channels"] == vae_cfg["latent_channels"]
    assert m["task"] == "text-to-image" and m["unet_in_channels"] == unet_cfg["in_channels"] == 4
    assert m["vae_scaling_factor"] == vae_cfg["scaling_factor"]
    assert m["vae_scale_factor"] == 8
    assert m["native_resolution"] == unet_cfg["sample_size"] * 8
    assert m["tokenizers"][0]["max_length"] == 77
    assert len(m["tokenizers"]) == (2 if family == "sdxl" else 1)
    assert m["engines"] == {}
    assert m["sdrt_version"]
    for rec in m["components"].values():
        assert rec["sha256"] == sha256_file(root / rec["file"])
        assert rec["precision"] == "fp32"
        assert all(isinstance(d, (int, str)) for t in rec["inputs"] + rec["outputs"] for d in t["shape"])
    # scheduler config and model_index travel verbatim
    assert (root / "scheduler/scheduler_config.json").read_bytes() == (ckpt / "scheduler/scheduler_config.json").read_bytes()
    assert json.loads((root / "model_index.json").read_text()) == json.loads((ckpt / "model_index.json").read_text())


def test_sdxl_exposes_penultimate_hidden_states_and_pooled_embedding(model_dir):
    m = _manifest(model_dir("sdxl"))
    # the penultimate layer's states (3 layers: hidden_states.0 is the embeddings'), named as optimum names them
    assert [o["name"] for o in m["components"]["text_encoder"]["outputs"]] == ["hidden_states.2"]
    assert [o["name"] for o in m["components"]["text_encoder_2"]["outputs"]] == ["hidden_states.2", "text_embeds"]
    assert [i["name"] for i in m["components"]["unet"]["inputs"]][-2:] == ["text_embeds", "time_ids"]


@pytest.mark.parametrize("family", INPAINT_FAMILIES)
def test_inpainting_checkpoint_exports_with_a_nine_channel_unet(model_dir, checkpoint, family):
    root = model_dir(family)
    m = _manifest(root)
    index = json.loads((checkpoint(family) / "model_index.json").read_text())
    assert index["_class_name"] in ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")
    assert m["family"] == family.removesuffix("-inpaint")
    assert (m["task"], m["unet_in_channels"], m["latent_channels"]) == ("inpainting", 9, 4)
    unet = m["components"]["unet"]
    assert unet["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": ["batch", 9, "latent_height", "latent_width"]}
    assert unet["outputs"][0]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    assert m["components"]["vae_decoder"]["inputs"][0]["shape"][1] == 4
    assert unet["validation"]["max_rel_error"] <= 1e-3


def test_inpaint_pipeline_with_a_four_channel_unet_exports_as_text_to_image(checkpoint, tmp_path):
    from sdrt.export.exporter import export_model

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint("sd1"), ck)
    index = json.loads((ck / "model_index.json").read_text())
    (ck / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    m = export_model(ck, tmp_path / "out", log=lambda *_: None)
    assert (m["task"], m["unet_in_channels"]) == ("text-to-image", 4)


def _with_unet_config(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "unet/config.json").read_text())
    (dest / "unet/config.json").write_text(json.dumps({**cfg, **changes}))
    return dest


def test_error_unsupported_unet_channel_count(capsys, checkpoint, tmp_path):
    ck = _with_unet_config(checkpoint("sd1"), tmp_path / "ck", in_channels=7)
    code, err = _cli(capsys, "export", ck, "--out", tmp_path / "out")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "the UNet has 7 input channels" in err and "4 (text to image)" in err and "9 (inpainting" in err
    assert not (tmp_path / "out").exists()


def test_latent_channels_come_from_the_vae(checkpoint, tmp_path):
    from sdrt.export.checkpoint import CheckpointError, load_checkpoint
    from sdrt.export.families import get

    ckpt = load_checkpoint(checkpoint("sd1-inpaint"))
    assert ckpt.unet.config.in_channels == 9
    assert get(ckpt.family).manifest_facts(ckpt)["latent_channels"] == ckpt.vae.config.latent_channels == 4
    # a VAE with other latent channels changes what the UNet must take: 9 no longer fits
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint("sd1-inpaint"), ck)
    vae = json.loads((ck / "vae/config.json").read_text())
    (ck / "vae/config.json").write_text(json.dumps({**vae, "latent_channels": 16}))
    with pytest.raises(CheckpointError, match="9 input channels and the VAE 16 latent channels.*16 \\(text to image\\) and 33"):
        load_checkpoint(ck)


PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "Ünïcödé café — naïve façade, 東京タワー, emoji 🚀🌕",
    "punctuation!!! (weights:1.2), [brackets]; semi-colons... and 'quotes' \"double\"",
    "  leading and   multiple   spaces\tand\ttabs\nnewline  ",
    " ".join(["a very long prompt that keeps going"] * 20),  # far past 77 tokens
]


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_tokenizer_json_encodes_like_the_transformers_tokenizer(model_dir, checkpoint, family):
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    root, ckpt = model_dir(family), checkpoint(family)
    for rec, sub in zip(_manifest(root)["tokenizers"], ("tokenizer", "tokenizer_2")):
        ours = Tokenizer.from_file(str(root / rec["file"]))
        theirs = CLIPTokenizer.from_pretrained(ckpt / sub)
        assert rec["pad_token_id"] == theirs.pad_token_id and rec["eos_token_id"] == theirs.eos_token_id
        for prompt in PROMPTS:
            assert ours.encode(prompt).ids == theirs(prompt).input_ids, prompt
        assert len(theirs(PROMPTS[-1]).input_ids) > 77


# --- errors: one line, non-zero exit, no traceback -------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    from sdrt.cli import main

    code = main(list(map(str, args)))
    err = capsys.readouterr().err.strip()
    return code, err


def test_error_missing_checkpoint(capsys, tmp_path):
    code, err = _cli(capsys, "export", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 1 and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_records_generation_defaults(capsys, checkpoint, tmp_path):
    from sdrt.runtime.manifest import load_manifest

    out = tmp_path / "m"
    code, err = _cli(capsys, "export", checkpoint("sd1"), "--out", out, "--default-guidance", "3",
                     "--default-steps", "20")
    assert code == 0, err
    assert load_manifest(out)["generation_defaults"] == {"guidance_scale": 3.0, "num_inference_steps": 20}
    from sdrt.cli import main

    assert main(["info", str(out)]) == 0
    assert "generation defaults: guidance_scale 3.0, num_inference_steps 20" in capsys.readouterr().out
    for flag, value, msg in (("--default-steps", "0", "--default-steps must be an integer >= 1, got 0"),
                             ("--default-guidance", "-2", "--default-guidance must be a number >= 0, got -2.0"),
                             ("--default-guidance", "nan", "--default-guidance must be a number >= 0, got nan")):
        code, err = _cli(capsys, "export", checkpoint("sd1"), "--out", tmp_path / "bad", flag, value)
        assert code == 1 and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_error_directory_is_not_a_diffusers_checkpoint(capsys, tmp_path):
    (tmp_path / "ck").mkdir()
    code, err = _cli(capsys, "export", tmp_path / "ck", "--out", tmp_path / "out")
    assert code == 1 and "model_index.json is missing" in err and len(err.splitlines()) == 1


def test_error_names_the_missing_component_file(capsys, checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint("sd1"), ck)
    (ck / "unet/config.json").unlink()
    code, err = _cli(capsys, "export", ck, "--out", tmp_path / "out")
    assert code == 1 and "unet/config.json is missing" in err


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline", "SomeNewPipeline"])
def test_error_unsupported_architecture_lists_supported_families(capsys, tmp_path, pipeline):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    code, err = _cli(capsys, "export", ck, "--out", tmp_path / "out")
    assert code == 1 and "sd1" in err and "sdxl" in err and len(err.splitlines()) == 1


def test_error_corrupt_or_truncated_weights(capsys, checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint("sd1"), ck)
    weights = ck / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli(capsys, "export", ck, "--out", tmp_path / "out")
    assert code == 1 and "corrupt or truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_error_output_folder_cannot_be_written(capsys, checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _cli(capsys, "export", checkpoint("sd1"), "--out", blocker / "out")
    assert code == 1 and "output folder" in err and len(err.splitlines()) == 1


def test_error_single_file_without_config(capsys, tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 64)
    code, err = _cli(capsys, "export", single, "--out", tmp_path / "out")
    assert code == 1 and "--config" in err and len(err.splitlines()) == 1


class _Exploit:
    """A pickle that would create a file if unpickled with code execution allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_ckpt_is_loaded_without_executing_pickled_code(capsys, checkpoint, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": _Exploit(marker)}}, tmp_path / "evil.ckpt")
    code, err = _cli(capsys, "export", tmp_path / "evil.ckpt", "--config", checkpoint("sd1"), "--out", tmp_path / "out")
    assert code == 1 and len(err.splitlines()) == 1
    assert not marker.exists(), "pickled code ran"


def test_existing_target_is_refused_without_overwrite(capsys, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(capsys, "export", checkpoint("sd1"), "--out", out)
    assert code == 1 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_verbose_shows_the_traceback(tmp_path):
    from sdrt.cli import UserError, main
    from sdrt.export.checkpoint import CheckpointError

    with pytest.raises(UserError) as info:
        main(["--verbose", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert isinstance(info.value.__cause__, CheckpointError)


# --- atomicity ---------------------------------------------------------------------------------


def test_failed_export_keeps_the_previous_model_directory(model_dir, checkpoint, tmp_path, monkeypatch):
    import sdrt.export.exporter as exporter

    out = tmp_path / "model"
    shutil.copytree(model_dir("sd1"), out)
    before = (out / "sdrt.json").read_bytes()

    def boom(*a, **k):
        raise exporter.ValidationError("unet: simulated failure")

    monkeypatch.setattr(exporter, "compare", boom)
    with pytest.raises(exporter.ExportError, match="simulated"):
        exporter.export_model(checkpoint("sd1"), out, overwrite=True, log=lambda *_: None)
    assert (out / "sdrt.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder left behind"


@pytest.mark.parametrize("previous", [False, True], ids=["no-target", "old-target"])
def test_killed_export_leaves_no_target_and_the_old_one_intact(model_dir, checkpoint, tmp_path, previous):
    out = tmp_path / "model"
    if previous:
        shutil.copytree(model_dir("sd1"), out)
        before = (out / "sdrt.json").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdrt.cli", "export", str(checkpoint("sd1")), "--out", str(out), "--overwrite"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in proc.stdout:
        if line.startswith("[3/4]"):  # text encoder written, UNet done: kill in the middle
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    if previous:
        assert (out / "sdrt.json").read_bytes() == before
    else:
        assert not out.exists()
    # the next export cleans up what the killed one left and succeeds
    from sdrt.export.exporter import export_model

    export_model(checkpoint("sd1"), out, overwrite=True, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- packaging ---------------------------------------------------------------------------------


def test_real_install_puts_only_the_sdrt_namespace_in_site_packages(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(repo)],
        check=True, cwd=tmp_path,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"sdrt"}, top
    for sub in ("export", "runtime", "benchmarks", "runtime/schedulers", "runtime/backends", "runtime/families"):
        assert (target / "sdrt" / sub / "__init__.py").is_file(), sub
    code = ("import sdrt.runtime.manifest, sdrt.runtime.pipeline, sdrt.export, sdrt.benchmarks, sdrt.cli; "
            "print(sdrt.runtime.manifest.__file__)")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip().startswith(str(target))
    src_model = repo / "runtime" / "assets" / "default-model"
    if (src_model / "sdrt.json").is_file():  # the built-in default model travels as package data
        def files(root):
            rel = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
            return sorted(str(r) for r in rel if r.parts[0] != "cache")

        installed = target / "sdrt" / "runtime" / "assets" / "default-model"
        assert files(installed) == files(src_model)


def test_fp16_export_halves_text_encoder_and_unet_and_keeps_the_vae_fp32(checkpoint, tmp_path):
    import onnx
    import onnxruntime as ort

    from sdrt.export.exporter import export_model

    out = tmp_path / "fp16"
    m = export_model(checkpoint("sd1"), out, fp16=True, log=lambda *_: None)
    precision = {name: rec["precision"] for name, rec in m["components"].items()}
    assert precision == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    for name, rec in m["components"].items():
        graph = onnx.load(str(out / rec["file"])).graph
        weight_bytes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
        for t in graph.initializer:
            if t.data_type in weight_bytes:
                weight_bytes[t.data_type] += len(t.raw_data)
        half_share = weight_bytes[onnx.TensorProto.FLOAT16] / sum(weight_bytes.values())
        # a few small fp32 tensors stay (e.g. Resize scales must be float32)
        assert half_share > 0.99 if rec["precision"] == "fp16" else half_share == 0, (name, half_share)
        assert all(t["dtype"] in ("float32", "int32") for t in rec["inputs"] + rec["outputs"]), "fp32 I/O"
        ort.InferenceSession(str(out / rec["file"]), providers=["CPUExecutionProvider"])  # loads
        assert rec["validation"]["max_rel_error"] <= 5e-2, name
