"""The runtime: loading, tokenization, backends, CLI, and every bad input getting a clear error.
Image parity with diffusers lives in test_parity.py."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from sdrt.runtime.pipeline import GenerationError, NonFiniteError, Pipeline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def sd1(model_dir):
    return Pipeline.load(model_dir("sd1"))


def _gen(pipe, **kw):
    args = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np")
    args.update(kw)
    return pipe("a red circle", **args)


# --- behaviour -------------------------------------------------------------------------------


def test_defaults_come_from_the_model_directory(sd1):
    out = sd1("a red circle", num_inference_steps=2, seed=0, output_type="np")
    native = sd1.manifest["native_resolution"]
    assert out.images.shape == (1, native, native, 3)
    assert out.parameters["scheduler"] == "pndm"  # the checkpoint's own PNDMScheduler


def test_seed_makes_runs_reproducible_and_different_seeds_differ(sd1):
    a, b, c = _gen(sd1, seed=1).images, _gen(sd1, seed=1).images, _gen(sd1, seed=2).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_output_np_is_float32_bhwc_in_unit_range_and_pil_is_rgb(sd1):
    im = _gen(sd1, num_images_per_prompt=2).images
    assert im.dtype == np.float32 and im.shape == (2, 64, 64, 3) and im.min() >= 0 and im.max() <= 1
    pil = _gen(sd1, output_type="pil").images
    assert len(pil) == 1 and pil[0].mode == "RGB" and pil[0].size == (64, 64)


def test_timings_cover_every_stage_and_unet_call(sd1):
    out = _gen(sd1, num_inference_steps=3, scheduler="euler")
    t = out.timings.as_dict()
    assert len(t["unet_per_call"]) == 3
    for key in ("tokenize", "text_encoder", "scheduler", "vae_decoder", "total"):
        assert t[key] > 0, key
    assert t["total"] >= t["unet_total"] + t["vae_decoder"]


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_tokens(sd1):
    prompt = " ".join(["word"] * 100)
    with pytest.warns(UserWarning, match=r"the last 25 were dropped"):
        ids = sd1.tokenizers[0]([prompt])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_token_ids_match_the_transformers_tokenizer_with_diffusers_settings(sd1, checkpoint):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(checkpoint("sd1") / "tokenizer")
    prompts = ["", "a photo of a cat", "Ünïcödé 🚀 café!!", " ".join(["long"] * 90)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sd1.tokenizers[0](prompts)
    theirs = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert np.array_equal(ours, theirs)


def test_cpu_sessions_use_physical_cores_and_no_spinning(sd1):
    from sdrt.runtime.backends.onnxruntime import physical_cores

    opts = sd1.engine("unet").session.get_session_options()
    assert opts.intra_op_num_threads == physical_cores()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_optimized_graph_is_cached_and_reused(model_dir, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root, ignore=shutil.ignore_patterns("cache"))
    first = _gen(Pipeline.load(root)).images
    cached = sorted(p.name for p in (root / "cache").iterdir())
    assert any(n.startswith("unet-cpu-") for n in cached) and all(not n.startswith(".") for n in cached)
    second = _gen(Pipeline.load(root)).images
    assert sorted(p.name for p in (root / "cache").iterdir()) == cached
    np.testing.assert_allclose(first, second, atol=1e-5)


def test_the_default_model_caches_in_the_user_cache_even_from_a_source_checkout(tmp_path, monkeypatch):
    import sdrt.runtime.default_model as dm
    from sdrt.runtime.backends.onnxruntime import _writable_cache_root

    model = tmp_path / "assets" / "default-model"
    model.mkdir(parents=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dm, "DEFAULT_MODEL_DIR", model)
    assert _writable_cache_root(model) == tmp_path / "xdg" / "sdrt"
    assert not (model / "cache").exists()  # nothing is written into the package data
    other = tmp_path / "other-model"
    other.mkdir()
    assert _writable_cache_root(other) == other / "cache"  # an ordinary writable model: beside it


def test_vae_encoder_is_only_opened_for_image_to_image(model_dir):
    pipe = Pipeline.load(model_dir("sd1"))
    _gen(pipe)
    assert pipe.engine("vae_encoder")._engine is None
    _gen(pipe, image=np.full((1, 64, 64, 3), 0.5, np.float32), strength=0.5)
    assert pipe.engine("vae_encoder")._engine is not None


def test_png_carries_the_generation_parameters(model_dir, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.runtime.images import read_parameters

    out = tmp_path / "img.png"
    code = main(["generate", "a blue square", "--model", str(model_dir("sd1")), "--out", str(out), "--steps", "2",
                 "--height", "64", "--width", "64", "--seed", "7", "--num-images", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "UNet" in printed and "wrote" in printed
    params = read_parameters(tmp_path / "img-1.png")
    assert params["prompt"] == "a blue square" and params["seed"] == 7 and params["num_inference_steps"] == 2
    assert params["image_index"] == 1 and (tmp_path / "img-0.png").is_file()


def test_generation_runs_where_torch_diffusers_and_transformers_cannot_be_imported(model_dir, tmp_path,
                                                                                    run_torch_free):
    code = f"""
        from sdrt.cli import main
        rc = main(["generate", "a cat", "--model", {str(model_dir("sdxl"))!r}, "--out", {str(tmp_path / "x.png")!r},
                   "--steps", "2", "--height", "64", "--width", "64", "--seed", "1", "--quiet",
                   "--init-image", {str(tmp_path / "init.png")!r}, "--strength", "0.5"])
        assert rc == 0, rc
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "sdrt") and m.startswith(("torch", "diffusers", "transformers", "sdrt.export"))]
        assert not bad, bad
        print("ok")
    """
    from PIL import Image

    Image.new("RGB", (80, 72), (200, 30, 30)).save(tmp_path / "init.png")
    res = run_torch_free(code, tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr
    assert (tmp_path / "x.png").is_file()


def test_runtime_sources_never_import_heavy_dependencies():
    import ast
    from pathlib import Path

    import sdrt.runtime

    for path in Path(sdrt.runtime.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "diffusers", "transformers") and not n.startswith("sdrt.export"), (path, n)


def test_engines_open_side_by_side_and_a_failure_closes_those_that_opened():
    import threading

    from sdrt.runtime.backends import open_all

    barrier = threading.Barrier(3, timeout=30)  # passes only if all three openers run at once

    class Fake:
        closed = False

        def close(self):
            self.closed = True

    def opener(fail=False):
        def run():
            barrier.wait()
            if fail:
                raise RuntimeError("unet failed")
            return Fake()
        return run

    opened = open_all({"text_encoder": opener(), "unet": opener(), "vae_decoder": opener()})
    assert list(opened) == ["text_encoder", "unet", "vae_decoder"] and not any(e.closed for e in opened.values())

    barrier.reset()
    made = []

    def kept(run):
        return lambda: made.append(run()) or made[-1]

    with pytest.raises(RuntimeError, match="unet failed"):
        open_all({"text_encoder": kept(opener()), "unet": opener(fail=True), "vae_decoder": kept(opener())})
    assert len(made) == 2 and all(e.closed for e in made)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(height=100), r"height 100 is not a multiple of 8; use 96 or 104"),
    (dict(width=63), r"width 63 is not a multiple of 8; use 56 or 64"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an integer >= 1"),
    (dict(image=np.zeros((1, 64, 64, 3), np.float32), strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(image=np.zeros((1, 64, 64, 3), np.float32), strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(scheduler="foo"), r"unknown scheduler 'foo'; valid names: ddim, pndm, euler"),
    (dict(negative_prompt=["a", "b"]), r"2 negative prompts for 1 prompts"),
    (dict(image="/nonexistent/init.png"), r"cannot read the init image"),
    (dict(output_type="pt"), r"output_type must be 'pil' or 'np'"),
])
def test_bad_generation_arguments_get_clear_errors(sd1, kw, match):
    with pytest.raises(GenerationError, match=match):
        _gen(sd1, **kw)


def test_unreadable_init_image_file_is_a_clear_error(sd1, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("this is not a png")
    with pytest.raises(GenerationError, match="cannot read the init image"):
        _gen(sd1, image=str(bad))


def test_missing_model_directory_and_file_are_named(model_dir, tmp_path):
    from sdrt.runtime.manifest import ModelDirError

    with pytest.raises(ModelDirError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")
    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    (root / "unet/model.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"unet/model.onnx is missing"):
        Pipeline.load(root)


def test_manifest_of_a_newer_format_is_refused(model_dir, tmp_path):
    from sdrt.runtime.manifest import ModelDirError

    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    m = json.loads((root / "sdrt.json").read_text())
    m["format_version"] = 99
    (root / "sdrt.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match="format version 99, newer than this sdrt understands"):
        Pipeline.load(root)


def _with_defaults(model_dir, tmp_path, defaults):
    root = tmp_path / "m"
    shutil.copytree(model_dir("sd1"), root)
    m = json.loads((root / "sdrt.json").read_text())
    m["generation_defaults"] = defaults
    (root / "sdrt.json").write_text(json.dumps(m))
    return root


def test_the_models_generation_defaults_apply_when_a_call_gives_none(model_dir, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.runtime.images import read_parameters

    root = _with_defaults(model_dir, tmp_path, {"guidance_scale": 3.0, "num_inference_steps": 3})
    pipe = Pipeline.load(root)
    out = _gen(pipe, num_inference_steps=None)
    assert out.parameters["guidance_scale"] == 3.0 and out.parameters["num_inference_steps"] == 3
    explicit = _gen(pipe, num_inference_steps=2, guidance_scale=5.0)
    assert explicit.parameters["guidance_scale"] == 5.0 and explicit.parameters["num_inference_steps"] == 2
    plain = _gen(Pipeline.load(model_dir("sd1")), num_inference_steps=None)  # none recorded: diffusers' own
    assert plain.parameters["guidance_scale"] == 7.5 and plain.parameters["num_inference_steps"] == 50

    assert main(["generate", "a blue square", "--model", str(root), "--out", str(tmp_path / "a.png"), "--height", "64",
                 "--width", "64", "--seed", "1", "--quiet"]) == 0
    params = read_parameters(tmp_path / "a.png")
    assert params["guidance_scale"] == 3.0 and params["num_inference_steps"] == 3
    assert main(["generate", "a blue square", "--model", str(root), "--out", str(tmp_path / "b.png"), "--height", "64",
                 "--width", "64", "--steps", "2", "--guidance", "1", "--quiet"]) == 0
    params = read_parameters(tmp_path / "b.png")
    assert params["guidance_scale"] == 1.0 and params["num_inference_steps"] == 2


@pytest.mark.parametrize("defaults, match", [
    ({"guidance_scale": -1}, "guidance_scale must be a number >= 0, got -1"),
    ({"guidance_scale": "high"}, "guidance_scale must be a number >= 0"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1, got 2.5"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ([3.0], "generation_defaults must be an object"),
])
def test_bad_generation_defaults_in_a_manifest_are_named(model_dir, tmp_path, defaults, match):
    from sdrt.runtime.manifest import ModelDirError

    root = _with_defaults(model_dir, tmp_path, defaults)
    with pytest.raises(ModelDirError, match=rf"sdrt.json: .*{match}.*sdrt export --overwrite"):
        Pipeline.load(root)


def test_generation_defaults_this_sdrt_does_not_know_are_ignored_with_a_warning(model_dir, tmp_path):
    root = _with_defaults(model_dir, tmp_path, {"eta": 0.3, "guidance_scale": 0})
    with pytest.warns(UserWarning, match="ignoring generation default.s. this sdrt does not know: eta"):
        pipe = Pipeline.load(root)
    assert pipe.generation_defaults == {"guidance_scale": 0.0}
    assert _gen(pipe).parameters["guidance_scale"] == 0.0  # <= 1: no guidance, one UNet batch


class _Poisoned:
    def __init__(self, engine, output):
        self.engine, self.output = engine, output
        self.name, self.input_names, self.output_names = engine.name, engine.input_names, engine.output_names

    def __call__(self, **inputs):
        out = self.engine(**inputs)
        out[self.output] = out[self.output] * np.float32("nan")
        return out

    def close(self):
        pass


@pytest.mark.parametrize("stage, output, match", [
    ("unet", "out_sample", r"the UNet produced NaN or Inf at step 1/\d+ \(timestep"),
    ("vae_decoder", "sample", r"the VAE decoder produced NaN or Inf"),
])
def test_nan_from_an_engine_is_an_error_naming_the_stage(model_dir, stage, output, match, tmp_path, capsys):
    pipe = Pipeline.load(model_dir("sd1"))
    pipe.engines[stage] = _Poisoned(pipe.engines[stage], output)
    with pytest.raises(NonFiniteError, match=match):
        _gen(pipe)


@pytest.mark.parametrize("args, match", [
    (["--height", "100"], "height 100 is not a multiple of 8"),
    (["--steps", "0"], "--steps must be an integer >= 1"),  # the library names the argument, the CLI the flag
    (["--scheduler", "nope"], "valid names"),
    (["--init-image", "/nonexistent.png"], "does not exist"),
    (["--negative-prompt", "x", "--strength", "2", "--init-image", "__init__"], "strength must be in"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
])
def test_cli_prints_one_line_and_exits_non_zero(model_dir, tmp_path, capsys, args, match):
    from PIL import Image

    from sdrt.cli import main

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    args = [str(init) if a == "__init__" else a for a in args]
    code = main(["generate", "a cat", "--model", str(model_dir("sd1")), "--out", str(tmp_path / "o.png"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 1 and match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_cli_model_directory_missing(tmp_path, capsys):
    from sdrt.cli import main

    code = main(["generate", "a cat", "--model", str(tmp_path / "nope"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "does not exist" in err and len(err.splitlines()) == 1


def test_tensorrt_backend_without_tensorrt_is_one_line_naming_the_install(model_dir, capsys, tmp_path):
    from sdrt.cli import main

    code = main(["generate", "a cat", "--model", str(model_dir("sd1")), "--backend", "tensorrt", "--quiet",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "sdrt[tensorrt]" in err and len(err.splitlines()) == 1


def test_low_memory_mode_gives_the_same_image_and_releases_every_engine(model_dir, sd1):
    lean = Pipeline.load(model_dir("sd1"), low_memory=True)
    assert all(e._engine is None for e in lean.engines.values()), "nothing is loaded before it is needed"
    img = _gen(lean, image=np.full((1, 64, 64, 3), 0.3, np.float32), strength=0.7).images
    assert all(e._engine is None for e in lean.engines.values()), "every engine is released after its stage"
    ref = _gen(sd1, image=np.full((1, 64, 64, 3), 0.3, np.float32), strength=0.7).images
    np.testing.assert_allclose(img, ref, atol=1e-5)
