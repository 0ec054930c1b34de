"""The SDXL base -> refiner hand-off against diffusers: the base stopped at ``denoising_end`` with
``output_type="latent"``, the refiner (StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score: the
second text encoder alone, five time ids) continuing from ``denoising_start`` on those latents."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_parity import diffusers_scheduler_class, single_thread  # noqa: E402,F401

from sdrt.runtime.errors import GenerationError  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.schedulers import diffusers_equivalent  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

TOL = 2e-3
STEPS = 10
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"


@pytest.fixture(scope="module")
def reference(checkpoint):
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(checkpoint("sdxl"), torch_dtype=torch.float32,
                                                               add_watermarker=False)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(checkpoint("sdxl-refiner"),
                                                                         torch_dtype=torch.float32, add_watermarker=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    return base, refiner


@pytest.fixture(scope="module")
def pipes(model_dir):
    base = Pipeline.load(model_dir("sdxl"), backend="ort-cpu", threads=1)
    refiner = Pipeline.load(model_dir("sdxl-refiner"), backend="ort-cpu", threads=1)
    yield base, refiner
    base.close()
    refiner.close()


def _use(pipe, name):
    cls, implied = diffusers_equivalent(name)
    pipe.scheduler = diffusers_scheduler_class(cls).from_config(pipe.scheduler.config, **implied)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m", "heun"])
@pytest.mark.parametrize("split", [0.8, 0.5])
def test_base_to_refiner_matches_diffusers(reference, pipes, split, scheduler):
    ref_base, ref_refiner = reference
    base, refiner = pipes
    m = base.manifest
    size = m["native_resolution"] // m["vae_scale_factor"]
    noise = np.random.default_rng(3).standard_normal((1, m["latent_channels"], size, size), dtype=np.float32)
    common = dict(num_inference_steps=STEPS, negative_prompt=NEGATIVE)
    for p in (ref_base, ref_refiner):
        _use(p, scheduler)
    with torch.no_grad():
        ref_latents = ref_base(PROMPT, latents=torch.from_numpy(noise), denoising_end=split, output_type="latent",
                               **common).images
        expected = np.asarray(ref_refiner(PROMPT, image=ref_latents, denoising_start=split, output_type="np",
                                          aesthetic_score=7.0, negative_aesthetic_score=2.0, **common).images)
    latents = base(PROMPT, latents=noise, denoising_end=split, output_type="latent", scheduler=scheduler, **common).images
    assert isinstance(latents, np.ndarray) and latents.shape == noise.shape
    lat_err = float(np.abs(latents - ref_latents.numpy()).max())
    out = refiner(PROMPT, image=latents, denoising_start=split, output_type="np", scheduler=scheduler,
                  aesthetic_score=7.0, negative_aesthetic_score=2.0, **common)
    err = float(np.abs(out.images - expected).max())
    print(f"split {split} {scheduler}: latents max abs {lat_err:.2e}, image max abs {err:.2e}, "
          f"{len(out.timings.unet)} refiner UNet calls")
    assert lat_err <= 1e-3 and err <= TOL
    assert out.parameters["denoising_start"] == split and out.parameters["aesthetic_score"] == 7.0


def test_refiner_on_an_image_matches_diffusers(reference, pipes, monkeypatch):
    """The refiner alone, as image to image on a picture (strength, the default aesthetic scores), the same
    noise on both sides."""
    from test_parity import IMAGE, SIZE, RecordingGenerator, patch_randn_tensor

    _, ref_refiner = reference
    _, refiner = pipes
    _use(ref_refiner, "euler")
    out = refiner(PROMPT, image=IMAGE, strength=0.5, num_inference_steps=STEPS, scheduler="euler", output_type="np",
                  height=SIZE, width=SIZE, generator=RecordingGenerator(5))
    patch_randn_tensor(monkeypatch, RecordingGenerator(5))
    with torch.no_grad():
        expected = np.asarray(ref_refiner(PROMPT, image=IMAGE, strength=0.5, num_inference_steps=STEPS,
                                          output_type="np").images)
    err = float(np.abs(out.images - expected).max())
    print(f"refiner image to image: max abs {err:.2e}")
    assert err <= TOL


def test_hand_off_errors(pipes):
    base, refiner = pipes
    lat = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(GenerationError, match="SDXL refiner"):
        refiner(PROMPT, num_inference_steps=2)
    with pytest.raises(GenerationError, match="denoising_end must be a number in"):
        base(PROMPT, denoising_end=1.5, num_inference_steps=2)
    with pytest.raises(GenerationError, match="give image="):
        base(PROMPT, denoising_start=0.5, num_inference_steps=2)
    with pytest.raises(GenerationError, match="must be below"):
        refiner(PROMPT, image=lat, denoising_start=0.8, denoising_end=0.5, num_inference_steps=2)
    with pytest.raises(GenerationError, match="does not match the latents"):
        refiner(PROMPT, image=lat, denoising_start=0.8, height=256, num_inference_steps=4)
    with pytest.raises(GenerationError, match="leaves no denoising step"):
        refiner(PROMPT, image=lat, denoising_start=0.9999, num_inference_steps=2)
    with pytest.raises(GenerationError, match="aesthetic_score must be a finite number"):
        refiner(PROMPT, image=lat, denoising_start=0.5, aesthetic_score=float("nan"), num_inference_steps=4)


def test_cli_refiner(model_dir, pipes, tmp_path, capsys):
    """`sdrt generate --refiner DIR --refiner-start F`: the base's latents through the refiner, the same image as
    the two Python calls sharing one noise source; a refiner that is not one, or a base it cannot refine: one line."""
    from PIL import Image

    from sdrt.cli import main

    base, refiner = pipes
    out = tmp_path / "refined.png"
    args = ["generate", PROMPT, "--model", str(model_dir("sdxl")), "--steps", str(STEPS), "--seed", "4", "--quiet",
            "--backend", "ort-cpu", "--scheduler", "dpm++2m"]
    assert main(args + ["--out", str(out), "--refiner", str(model_dir("sdxl-refiner")), "--refiner-start", "0.7"]) == 0
    gen = np.random.default_rng(4)
    latents = base(PROMPT, num_inference_steps=STEPS, scheduler="dpm++2m", generator=gen, denoising_end=0.7,
                   output_type="latent").images
    expected = refiner(PROMPT, image=latents, num_inference_steps=STEPS, scheduler="dpm++2m", generator=gen,
                       denoising_start=0.7).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    # --from-png finds the refiner again
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again), "--quiet", "--backend", "ort-cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "x.png"), "--refiner", str(model_dir("sdxl"))]) == 1
    assert "not an SDXL refiner" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--model", str(model_dir("sd1")), "--out", str(tmp_path / "y.png"),
                 "--refiner", str(model_dir("sdxl-refiner"))]) == 1
    assert "this base is a sd1 model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
