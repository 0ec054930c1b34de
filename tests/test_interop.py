"""Interop: model directories optimum reads and writes, test checkpoints like the Hub's, and PNG metadata
that AUTOMATIC1111 and community readers parse.

optimum-onnx pins transformers < 4.58, so it runs in a virtual environment of its own (tests/optimum_env.py,
made once and cached); images cross between the two through .npy files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
TOLERANCE = 2e-3
PROMPT, STEPS, GUIDANCE = "a red circle on a blue background", 4, 7.5


# -- the optimum environment --------------------------------------------------------------------


@pytest.fixture(scope="session")
def optimum_python():
    sys.path.insert(0, str(HERE))
    try:
        import optimum_env

        return optimum_env.ensure(log=lambda m: print(m, file=sys.stderr))
    except (RuntimeError, OSError) as e:
        pytest.skip(f"the optimum-onnx environment cannot be made here: {e}")
    finally:
        sys.path.remove(str(HERE))


def _run(python, *args, timeout=900):
    r = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stderr[-3000:]}"
    return r.stdout


def optimum_image(python, model_dir: Path, latents: np.ndarray, tmp: Path) -> np.ndarray:
    """optimum's ORTDiffusionPipeline.from_pretrained(model_dir) drawing PROMPT from ``latents``."""
    np.save(tmp / "latents.npy", latents)
    _run(python, HERE / "optimum_draw.py", model_dir, tmp / "latents.npy", tmp / "optimum.npy", PROMPT, STEPS, GUIDANCE)
    return np.load(tmp / "optimum.npy")


def sdrt_image(model_dir: Path, latents: np.ndarray) -> np.ndarray:
    from sdrt import Pipeline

    pipe = Pipeline.load(model_dir)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="np").images[0]


def _latents(size=16):
    return np.random.default_rng(0).standard_normal((1, 4, size, size)).astype(np.float32)


@pytest.fixture(scope="session")
def optimum_export(tmp_path_factory, checkpoint, optimum_python):
    """optimum_export(family) -> a directory written by `optimum-cli export onnx --task text-to-image`."""
    def make(family):
        out = tmp_path_factory.getbasetemp() / "optimum" / family
        if not (out / "model_index.json").is_file():
            cli = Path(optimum_python).parent / "optimum-cli"
            _run(cli, "export", "onnx", "--model", checkpoint(family), "--task", "text-to-image", out)
        return out

    return make


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# -- test checkpoints and exports like the Hub's ------------------------------------------------

HUB_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TEXTS = ["a red circle on a blue background", "A Castle, on   a hill!! 1234 naïve café", ""]


def test_test_checkpoints_have_the_tokenizer_files_of_a_hub_checkpoint(checkpoint):
    from tokenizers import Tokenizer

    from sdrt.runtime.optimum import clip_tokenizer_json

    for folder in ("tokenizer", "tokenizer_2"):
        tok = checkpoint("sdxl") / folder
        assert all((tok / f).is_file() for f in HUB_TOKENIZER_FILES)
        config = json.loads((tok / "tokenizer_config.json").read_text())
        # what transformers 4's CLIPTokenizer reads
        assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
        assert config["bos_token"] == "<|startoftext|>" and config["eos_token"] == "<|endoftext|>"
        assert config["pad_token"] == ("<|endoftext|>" if folder == "tokenizer" else "!")
        special = json.loads((tok / "special_tokens_map.json").read_text())
        assert special["pad_token"] == config["pad_token"]
        # vocab.json + merges.txt tokenize as tokenizer.json does
        clip_tokenizer_json(tok / "vocab.json", tok / "merges.txt", tok.parent / f"{folder}-classic.json",
                            bos="<|startoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=config["pad_token"])
        a, b = Tokenizer.from_file(str(tok / "tokenizer.json")), Tokenizer.from_file(str(tok.parent / f"{folder}-classic.json"))
        assert [e.ids for e in a.encode_batch(TEXTS)] == [e.ids for e in b.encode_batch(TEXTS)]


def test_export_writes_each_components_config_and_the_hub_tokenizer_files(model_dir, checkpoint):
    root, ckpt = model_dir("sdxl"), checkpoint("sdxl")
    m = json.loads((root / "sdrt.json").read_text())
    sources = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
               "vae_decoder": "vae", "vae_encoder": "vae"}
    for name, src in sources.items():
        assert m["components"][name]["config"] == f"{name}/config.json"
        got = json.loads((root / name / "config.json").read_text())
        want = json.loads((ckpt / src / "config.json").read_text())
        for key in set(want) - {"_diffusers_version", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}:
            assert got[key] == want[key], (name, key)
    for folder in ("tokenizer", "tokenizer_2"):
        for f in HUB_TOKENIZER_FILES:
            assert (root / folder / f).is_file()
        assert (root / folder / "vocab.json").read_bytes() == (ckpt / folder / "vocab.json").read_bytes()


def test_a_text_encoder_runs_without_its_attention_mask(model_dir):
    """optimum's pipelines call a text encoder with the token ids alone: the mask defaults to all ones."""
    import onnxruntime as ort

    root = model_dir("sd1")
    sess = ort.InferenceSession(str(root / "text_encoder" / "model.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    ids = np.random.default_rng(0).integers(0, 400, (2, 77)).astype(np.int32)
    without = sess.run(None, {"input_ids": ids})[0]
    ones = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_array_equal(without, ones)


# -- optimum reads sdrt's export ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_optimum_draws_the_same_image_from_sdrts_export(model_dir, optimum_python, family, tmp_path):
    root = model_dir(family)
    before = _files(root)
    got = optimum_image(optimum_python, root, _latents(), tmp_path)
    want = sdrt_image(root, _latents())
    assert got.shape == want.shape and want.std() > 0.01
    assert float(np.abs(got - want).max()) <= TOLERANCE
    assert {k for k in _files(root) if not k.startswith("cache")} == {k for k in before if not k.startswith("cache")}


# -- sdrt reads optimum's export ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sdrt_draws_optimums_image_from_optimums_export(optimum_export, optimum_python, family, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = optimum_export(family)
    before = _files(root)
    want = optimum_image(optimum_python, root, _latents(), tmp_path)
    got = sdrt_image(root, _latents())
    assert float(np.abs(got - want).max()) <= TOLERANCE
    assert _files(root) == before  # nothing written into it: the derived manifest is in the user's cache
    manifests = list((tmp_path / "cache" / "sdrt" / "imported").glob("*/sdrt.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["family"] == family


@pytest.mark.slow
def test_sdrt_import_writes_a_full_model_directory(optimum_export, tmp_path, monkeypatch):
    from sdrt.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, out = optimum_export("sd1"), tmp_path / "imported"
    assert main(["import", str(root), "--out", str(out)]) == 0
    assert main(["info", "--verify", str(out)]) == 0
    assert not list(tmp_path.glob(".imported.*"))  # assembled beside the target, renamed into place
    m = json.loads((out / "sdrt.json").read_text())
    assert m["components"]["unet"]["inputs"][1]["shape"] == []  # optimum's scalar timestep, recorded
    assert [i["name"] for i in m["components"]["text_encoder"]["inputs"]] == ["input_ids"]
    for f in HUB_TOKENIZER_FILES:
        assert (out / "tokenizer" / f).is_file()
    np.testing.assert_array_equal(sdrt_image(out, _latents()), sdrt_image(root, _latents()))
    assert main(["import", str(root), "--out", str(out)]) == 1  # exists: refused without --overwrite
    assert main(["import", str(root), "--out", str(out), "--overwrite"]) == 0


# -- PNG metadata in AUTOMATIC1111's format ----------------------------------------------------

# AUTOMATIC1111's modules/infotext_utils.py parse_generation_parameters, less the webui's settings
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse_generation_parameters(x: str) -> dict:
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        m = A1111_RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def _generate(tmp_path, name, *flags):
    from sdrt.cli import main

    out = tmp_path / name
    assert main(["generate", *flags, "--out", str(out), "--quiet"]) == 0
    return out


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_png_parameters_are_automatic1111s_infotext_and_the_record_has_its_own_chunk(tmp_path):
    from PIL import Image

    out = _generate(tmp_path, "a.png", "a red circle, on a blue background", "--negative-prompt", "green: no",
                    "--seed", "42", "--steps", "5", "--guidance", "3", "--scheduler", "dpm++2m-karras")
    with Image.open(out) as im:
        text = dict(im.text)
    info = a1111_parse_generation_parameters(text["parameters"])
    assert info["Prompt"] == "a red circle, on a blue background"
    assert info["Negative prompt"] == "green: no"
    assert (info["Steps"], info["Sampler"], info["Schedule type"]) == ("5", "DPM++ 2M", "Karras")
    assert (info["CFG scale"], info["Seed"], info["Size-1"], info["Size-2"]) == ("3.0", "42", "128", "128")
    assert info["Model"] == "default-model" and "Denoising strength" not in info
    record = json.loads(text["sdrt"])
    assert record["scheduler"] == "dpm++2m-karras" and record["seed"] == 42 and record["num_inference_steps"] == 5


def test_from_png_reproduces_the_image_from_either_chunk_and_flags_win(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    first = _generate(tmp_path, "first.png", "a small blue star above a red square", "--seed", "7", "--steps", "6",
                      "--negative-prompt", "green")
    again = _generate(tmp_path, "again.png", "--from-png", str(first))
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    # an AUTOMATIC1111-only PNG (its parameters chunk alone): the infotext is parsed
    with Image.open(first) as im:
        info = PngInfo()
        info.add_text("parameters", im.text["parameters"])
        im.save(tmp_path / "webui.png", pnginfo=info)
    webui = _generate(tmp_path, "webui-again.png", "--from-png", str(tmp_path / "webui.png"))
    np.testing.assert_array_equal(_pixels(webui), _pixels(first))
    other = _generate(tmp_path, "other.png", "--from-png", str(first), "--seed", "8")
    with Image.open(other) as im:
        assert json.loads(im.text["sdrt"])["seed"] == 8 and json.loads(im.text["sdrt"])["num_inference_steps"] == 6
    assert not np.array_equal(_pixels(other), _pixels(first))


def test_from_png_without_parameters_is_one_line(tmp_path, capsys):
    from PIL import Image

    from sdrt.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path / "x.png")]) == 1
    assert "has no generation parameters" in capsys.readouterr().err
