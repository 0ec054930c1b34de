"""Inpainting parity with diffusers' AutoPipelineForInpainting, and inpainting's input errors.

Each case runs one random-weight checkpoint through diffusers (AutoPipelineForInpainting: the
StableDiffusion[XL]InpaintPipeline it picks) and through sdrt's Pipeline on the exported model directory,
with the same prompt, image, mask, settings and noise, and compares the decoded images.

Both kinds of UNet are covered: an inpainting UNet (9 input channels: latents, mask, masked-image latents;
the `*-inpaint` test checkpoints) and an ordinary one (4 channels), which both pipelines make keep the known
region by blending it back after every step.

Noise, the VAE encoder's sampling included: diffusers' randn_tensor is replaced by draws from a numpy
Generator in call order (test_parity.patch_randn_tensor), and sdrt gets a Generator with the same seed, so
the initial latents, the VAE encoder's posterior samples (image and masked image) and the stochastic
sampler's per-step noise are the same arrays on both sides; the order and shapes of the draws are compared
too.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# the text-to-image parity suite's inputs, noise recorder, fixtures (sdrt pipelines by name, one torch thread)
from test_parity import (  # noqa: E402,F401
    DIFFUSERS, IMAGE, NEGATIVE, PROMPT, SIZE, TOL, RecordingGenerator, patch_randn_tensor, sdrt_pipeline,
    single_thread,
)

from sdrt.runtime.errors import GenerationError  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

FAMILIES = ("sd1", "sd2", "sdxl")
UNETS = {"9ch": "{}-inpaint", "4ch": "{}"}  # which checkpoint of the family
# three deterministic schedulers (one multistep, one second-order) and one stochastic
SCHEDULERS = ("ddim", "dpm++2m", "heun", "euler-a")
STEPS = 5


def make_mask(size: int = SIZE):
    """A grayscale PIL mask: a white rectangle (repaint) with a soft edge, so binarization at 0.5 matters."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    soft = np.clip((x - size * 0.3) / (size * 0.2), 0.0, 1.0) * (y > size * 0.2) * (y < size * 0.8)
    return Image.fromarray(np.round(soft * 255).astype(np.uint8), mode="L")


MASK = make_mask()


@pytest.fixture(scope="module")
def reference(checkpoint):
    cache = {}

    def get(name):
        if name not in cache:
            kwargs = {"add_watermarker": False} if name.startswith("sdxl") else {}
            pipe = diffusers.AutoPipelineForInpainting.from_pretrained(checkpoint(name), torch_dtype=torch.float32, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = pipe
        return cache[name]

    return get


def run_pair(reference, sdrt_pipeline, monkeypatch, name, scheduler, strength, **settings):
    """Inpaint with diffusers and sdrt; assert pixel parity and identical noise draws; return both images."""
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, strength=strength, output_type="np")
    call.update(settings)
    ref = reference(name)
    class_name, implied = DIFFUSERS[scheduler]
    ref.scheduler = getattr(diffusers, class_name).from_config(dict(ref.scheduler.config), **implied)
    ref_gen = RecordingGenerator(0)
    patch_randn_tensor(monkeypatch, ref_gen)
    ref_latents = call.pop("latents", None)
    with torch.no_grad():
        expected = ref(**call, image=IMAGE, mask_image=MASK, height=SIZE, width=SIZE,
                       latents=None if ref_latents is None else torch.from_numpy(ref_latents)).images
    assert np.isfinite(expected).all()
    gen = RecordingGenerator(0)
    out = sdrt_pipeline(name)(**call, image=IMAGE, mask_image=MASK, height=SIZE, width=SIZE, scheduler=scheduler,
                              generator=gen, latents=ref_latents)
    assert out.parameters["task"] == "inpainting"
    assert out.images.shape == expected.shape
    err = np.abs(out.images - expected)
    # `pytest tests/test_inpaint.py -s | grep ^parity` lists the numbers
    print(f"parity {name} {scheduler} strength {strength}: max {err.max():.2e} median {np.median(err):.2e}")
    assert float(err.max()) <= TOL, f"max abs pixel difference {err.max():.3g} (median {np.median(err):.2g}) > {TOL}"
    assert gen.draws == ref_gen.draws, "the two pipelines draw noise in different orders or shapes"
    return out.images, expected


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("unet", list(UNETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_inpaint_parity(reference, sdrt_pipeline, monkeypatch, family, unet, scheduler, strength):
    run_pair(reference, sdrt_pipeline, monkeypatch, UNETS[unet].format(family), scheduler, strength,
             negative_prompt=NEGATIVE if scheduler == "ddim" else None)


def test_ordinary_unet_keeps_the_known_region_exactly(sdrt_pipeline):
    """With a 4-channel UNet the last blend puts the image's own latents back where the mask is black:
    two different prompts give the same latents there and different ones where it is white."""
    pipe = sdrt_pipeline("sd1")
    kw = dict(image=IMAGE, mask_image=MASK, num_inference_steps=3, output_type="latent", height=SIZE, width=SIZE)
    a = pipe(PROMPT, seed=5, **kw).images
    b = pipe("a watercolor painting of a lighthouse", seed=5, **kw).images
    keep = np.asarray(MASK)[::8, ::8] < 128  # the mask at latent resolution, as downsample_mask takes it
    np.testing.assert_array_equal(a[..., keep], b[..., keep])
    assert np.abs(a[..., ~keep] - b[..., ~keep]).max() > 1e-3


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("unet", list(UNETS))
def test_given_latents_are_the_initial_noise(reference, sdrt_pipeline, monkeypatch, unet, strength):
    """diffusers' inpainting prepare_latents takes given latents as the initial noise (times init sigma)
    whatever the strength, and (4 channels) as the noise of the known region's blend."""
    latents = np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    run_pair(reference, sdrt_pipeline, monkeypatch, UNETS[unet].format("sd1"), "euler", strength, latents=latents)


@pytest.mark.parametrize("unet", list(UNETS))
def test_batches_and_no_guidance(reference, sdrt_pipeline, monkeypatch, unet):
    name = UNETS[unet].format("sdxl")
    run_pair(reference, sdrt_pipeline, monkeypatch, name, "dpm++2m-sde", 0.6, num_images_per_prompt=2)
    run_pair(reference, sdrt_pipeline, monkeypatch, name, "euler-a", 1.0, guidance_scale=1.0,
             prompt=[PROMPT, "a lighthouse"], negative_prompt=[NEGATIVE, "text"])


# ---------------------------------------------------------------------------------------------- bad input


def test_mask_of_another_size(sdrt_pipeline):
    from PIL import Image

    image = Image.fromarray(np.round(IMAGE[0] * 255).astype(np.uint8))
    with pytest.raises(GenerationError, match=r"mask_image is 64x48 but image is 64x64"):
        sdrt_pipeline("sd1-inpaint")(PROMPT, image=image, mask_image=MASK.resize((64, 48)), num_inference_steps=1)


def test_mask_without_image(sdrt_pipeline):
    with pytest.raises(GenerationError, match=r"mask_image was given without image"):
        sdrt_pipeline("sd1")(PROMPT, mask_image=MASK, num_inference_steps=1)


def test_unreadable_mask_file(sdrt_pipeline, tmp_path):
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(GenerationError, match=r"cannot read the mask image .*mask.png"):
        sdrt_pipeline("sd1")(PROMPT, image=IMAGE, mask_image=bad, num_inference_steps=1)


def test_mask_neither_grayscale_nor_rgb(sdrt_pipeline):
    with pytest.raises(GenerationError, match=r"mask_image must be grayscale or RGB, got a RGBA image"):
        sdrt_pipeline("sd1")(PROMPT, image=IMAGE, mask_image=MASK.convert("RGBA"), num_inference_steps=1)


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "image-only"])
def test_inpainting_model_needs_a_mask(sdrt_pipeline, with_image):
    with pytest.raises(GenerationError, match=r"this is an inpainting model .* needs image and mask_image"):
        sdrt_pipeline("sd1-inpaint")(PROMPT, image=IMAGE if with_image else None, num_inference_steps=1)


def test_rgb_and_numpy_masks_match_grayscale(sdrt_pipeline):
    """An RGB mask, and the mask as numpy (H, W) in [0, 1], give the grayscale PIL mask's image."""
    pipe = sdrt_pipeline("sd1-inpaint")
    kw = dict(image=IMAGE, num_inference_steps=2, output_type="np", height=SIZE, width=SIZE)
    ref = pipe(PROMPT, mask_image=MASK, seed=1, **kw).images
    np.testing.assert_array_equal(pipe(PROMPT, mask_image=MASK.convert("RGB"), seed=1, **kw).images, ref)
    np.testing.assert_array_equal(pipe(PROMPT, mask_image=np.asarray(MASK) / 255.0, seed=1, **kw).images, ref)


# ---------------------------------------------------------------------------------------------- the CLI


def _generate(model, tmp_path, *extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdrt", "generate", PROMPT, "--model", str(model), "--steps", "2", "--seed", "0",
           "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


def test_cli_inpaint_writes_the_mask_into_the_parameters(model_dir, tmp_path):
    from PIL import Image

    from sdrt.runtime.images import read_parameters

    Image.fromarray(np.round(IMAGE[0] * 255).astype(np.uint8)).save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    r = _generate(model_dir("sd1-inpaint"), tmp_path, "--init-image", "init.png", "--mask", "mask.png",
                  "--strength", "0.9", "--out", "out.png")
    assert r.returncode == 0, r.stderr
    params = read_parameters(tmp_path / "out.png")
    assert params["mask"] == "mask.png" and params["init_image"] == "init.png" and params["task"] == "inpainting"
    assert params["strength"] == 0.9


@pytest.mark.parametrize("args,message", [
    (["--mask", "mask.png"], "--mask was given without --init-image"),
    (["--init-image", "init.png", "--mask", "missing.png"], "--mask missing.png does not exist"),
    (["--init-image", "init.png", "--mask", "bad.png"], "cannot read the mask image"),
    (["--init-image", "init.png", "--mask", "small.png"], "--mask is 32x32 but --init-image is 64x64"),
    (["--init-image", "init.png"], "this is an inpainting model"),
])
def test_cli_inpaint_errors(model_dir, tmp_path, args, message):
    from PIL import Image

    Image.fromarray(np.round(IMAGE[0] * 255).astype(np.uint8)).save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    MASK.resize((32, 32)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = _generate(model_dir("sd1-inpaint"), tmp_path, *args, "--out", "out.png")
    assert r.returncode == 1
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out.png").exists()
