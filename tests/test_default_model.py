"""The built-in default model: shipped as package data, generates without torch, and draws what
it is asked (colour and shape, checked by the project's evaluator, with fixed seeds)."""

from __future__ import annotations


import numpy as np
import pytest

from sdrt.export.default_model import data, evaluate, report
from sdrt.runtime.default_model import DEFAULT_MODEL_DIR, default_model_dir

pytestmark = pytest.mark.skipif(default_model_dir() is None, reason="the default model is not installed (train it with "
                                "python -m sdrt.export.default_model.train, export it into runtime/assets/default-model)")

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green star on a white background",
    "a blue triangle on a yellow background",
    "a white diamond on a purple background",
    "a black cross on an orange background",
]


@pytest.fixture(scope="module")
def pipe():
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(default_model_dir())


def test_the_shipped_model_fits_in_25_mb():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*")
               if p.is_file() and p.relative_to(DEFAULT_MODEL_DIR).parts[0] != "cache")
    assert size <= 25 * 2**20, size


def test_generate_uses_the_default_model_without_torch(tmp_path, run_torch_free):
    code = f"""
        from sdrt.cli import main
        raise SystemExit(main(["generate", "a red circle on a blue background", "--out", {str(tmp_path / "x.png")!r},
                               "--seed", "0", "--quiet"]))
    """
    res = run_torch_free(code, tmp_path)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    with Image.open(tmp_path / "x.png") as im:
        result = evaluate.evaluate(np.asarray(im.convert("RGB")), "a red circle on a blue background")
    assert result["background"], result


POSITIONED = [
    "a red circle on the left on a blue background",
    "a yellow square at the top on a black background",
    "a green star on the right on a white background",
    "a blue triangle at the bottom on a yellow background",
    "a white diamond on the left on a purple background",
    "a black cross at the top on an orange background",
]


def test_backgrounds_and_positions_come_out_as_asked(pipe):
    images = pipe(POSITIONED, num_inference_steps=20, seed=0, output_type="np").images
    acc = evaluate.accuracy(images, POSITIONED)
    assert acc["background"] == 1.0 and acc["found"] == 1.0 and acc["position"] >= 4 / 6, acc


def test_colours_and_shapes_come_out_as_asked(pipe):
    images = pipe(PROMPTS, num_inference_steps=20, seed=0, output_type="np").images
    acc = evaluate.accuracy(images, PROMPTS)
    assert acc["colour"] >= 5 / 6 and acc["shape"] >= 5 / 6, acc


def test_raising_guidance_raises_accuracy(pipe):
    """Classifier-free guidance acts: the same held-out prompts and latents at guidance 1 (the
    conditional prediction alone) and 2; more images get every asked-for attribute right (shapes
    sharpen). Measured on the shipped model, 20 steps, these 48 prompts: 0.90 of them fully right at
    1, 0.96 at 2, 0.83 at 7.5 (too much guidance over-saturates colours)."""
    prompts = data.held_out_prompts(48, 5)
    latents = report.initial_latents(len(prompts), 5)

    def score(g):
        return evaluate.accuracy(report.sdrt_images(pipe, prompts, latents, 20, g), prompts)

    low, high = score(1.0), score(2.0)
    assert high["all"] > low["all"], (low, high)


def test_a_colour_named_in_the_negative_prompt_is_avoided(pipe):
    """For prompts naming no colour, the colour the model draws most often is put in the negative
    prompt: the share of objects drawn in it must at least halve."""
    neg = report.negative_prompt_effect(pipe, 20, 7.5, seed=0)
    assert neg["share_after"] <= neg["share_before"] / 2, neg


def test_report_passes_backend_and_precision_to_pipeline_load(monkeypatch, capsys):
    """`--backend`/`--precision` reach Pipeline.load (defaults: auto, fp32); a precision the backend cannot
    run ends the report with its one-line error, before any image is made."""
    from sdrt.runtime.errors import ConfigError
    from sdrt.runtime.pipeline import Pipeline

    calls = []

    def load(path, **kwargs):
        calls.append(kwargs)
        raise ConfigError("not here")

    monkeypatch.setattr(Pipeline, "load", load)
    assert report.main([]) == 2
    assert report.main(["--backend", "openvino", "--precision", "bf16"]) == 2
    assert calls == [{"backend": "auto", "precision": "fp32"}, {"backend": "openvino", "precision": "bf16"}]
    assert "error: not here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--precision", "fp16"])
