"""End-to-end parity of the sdrt runtime (ONNX graphs + numpy pipeline) with diffusers fp32 on the CPU.

Each case runs the same random-weight checkpoint through diffusers' own pipeline (StableDiffusion[XL]Pipeline,
StableDiffusion[XL]Img2ImgPipeline) and through ``sdrt.runtime.pipeline.Pipeline`` on the exported model
directory, with the same prompt, settings and noise, and compares the decoded images (``output_type="np"``).

Noise: diffusers draws every random tensor with ``randn_tensor``; here that function is replaced, in every
diffusers module that imported it, by draws from a numpy Generator (``standard_normal(shape, float32)``) in
call order. The sdrt pipeline gets a Generator with the same seed, so both sides see the same initial latents,
VAE-encoder sample noise, add_noise noise and per-step noise of stochastic samplers, provided they draw in the
same order and shapes; the draws are recorded on both sides and compared too.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.schedulers import SCHEDULER_NAMES  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # diffusers' own schedulers hand torch tensors to np.array (numpy 2 DeprecationWarning); not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TOL = 2e-3  # max abs difference of [0, 1] pixels
SIZE = 64  # 8x8 latents
GUIDANCE = 7.5
STRENGTH = 0.6
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality, watermark"
FAMILIES = ("sd1", "sd2", "sdxl")
STEPS = (1, 2, 5, 25)

# name -> (diffusers class, config keys the name implies); written out independently of the module under test
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


class _SimpsonQuad:
    """Stand-in for scipy.integrate (not installed here) inside diffusers' LMS module: LMS integrates
    Lagrange basis polynomials of degree <= 3, for which one Simpson panel is exact."""

    @staticmethod
    def quad(f, a, b, epsrel=None):
        a, b = float(a), float(b)
        return (b - a) / 6 * (float(f(a)) + 4 * float(f((a + b) / 2)) + float(f(b))), 0.0


def diffusers_scheduler_class(class_name: str):
    if class_name == "LMSDiscreteScheduler":  # diffusers exports a dummy without scipy; the module itself imports
        from diffusers.schedulers import scheduling_lms_discrete

        if not hasattr(scheduling_lms_discrete, "integrate"):
            scheduling_lms_discrete.integrate = _SimpsonQuad
        return scheduling_lms_discrete.LMSDiscreteScheduler
    return getattr(diffusers, class_name)


def init_image(seed: int = 7) -> np.ndarray:
    """A smooth (1, 64, 64, 3) float image in [0, 1] with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0.5 * x * y], axis=-1)
    img = base + 0.05 * rng.standard_normal(base.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)[None]


IMAGE = init_image()


# ---------------------------------------------------------------------------------------------- fixtures


class Reference:
    """diffusers' text-to-image and image-to-image pipelines of one checkpoint, sharing components."""

    def __init__(self, path):
        if (path / "text_encoder_2").is_dir():
            self.txt2img = diffusers.StableDiffusionXLPipeline.from_pretrained(
                path, torch_dtype=torch.float32, add_watermarker=False
            )
            self.img2img = diffusers.StableDiffusionXLImg2ImgPipeline(
                **self.txt2img.components, add_watermarker=False
            )
        else:
            self.txt2img = diffusers.StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
            self.img2img = diffusers.StableDiffusionImg2ImgPipeline(
                **self.txt2img.components, requires_safety_checker=False
            )
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.txt2img.scheduler.config)

    def scheduler(self, name, overrides):
        class_name, implied = DIFFUSERS[name] if name else (self.scheduler_config["_class_name"], {})
        return diffusers_scheduler_class(class_name).from_config(self.scheduler_config, **{**overrides, **implied})


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread on both sides: these models are tiny, and on a shared 2-core machine torch's thread
    pool waiting on busy cores makes a 0.1 s call take seconds. Parity does not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(checkpoint):
    cache = {}

    def get(family) -> Reference:
        if family not in cache:
            cache[family] = Reference(checkpoint(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def sdrt_pipeline(model_dir):
    cache = {}

    def get(family) -> Pipeline:
        if family not in cache:
            cache[family] = Pipeline.load(model_dir(family), backend="ort-cpu", threads=1)
        return cache[family]

    yield get
    for pipe in cache.values():
        pipe.close()


class RecordingGenerator:
    """A numpy Generator that records the shapes drawn from it (the pipeline only calls standard_normal)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.draws = []

    def standard_normal(self, size=None, dtype=np.float64):
        self.draws.append(tuple(size))
        return self.rng.standard_normal(size, dtype=dtype)


def patch_randn_tensor(monkeypatch, gen: RecordingGenerator) -> list[str]:
    """Make diffusers' randn_tensor draw from ``gen`` in every module that imported it; returns those modules.

    Every diffusers module holding a ``randn_tensor`` is patched, not only those holding the original: a module
    first imported while an earlier test had torch_utils patched keeps that test's function after the undo.
    """

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        sample = torch.from_numpy(gen.standard_normal(tuple(shape), dtype=np.float32))
        return sample.to(device=device or "cpu", dtype=dtype or torch.float32)

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and module is not None and callable(vars(module).get("randn_tensor")):
            monkeypatch.setattr(module, "randn_tensor", randn_tensor)
            patched.append(name)
    return patched


# ---------------------------------------------------------------------------------------------- the check


def _call_kwargs(steps, prompt=PROMPT, negative_prompt=None, guidance_scale=GUIDANCE, num_images_per_prompt=1):
    return dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images_per_prompt,
        output_type="np",
    )


def run_diffusers(reference, monkeypatch, family, scheduler, steps, *, img2img=False, overrides=None,
                  strength=STRENGTH, seed=0, **settings):
    """diffusers' images (B, H, W, 3) and the shapes of the noise it drew, in order."""
    ref = reference(family)
    pipe = ref.img2img if img2img else ref.txt2img
    pipe.scheduler = ref.scheduler(scheduler, dict(overrides or {}))
    gen = RecordingGenerator(seed)
    patched = patch_randn_tensor(monkeypatch, gen)
    assert type(pipe).__module__ in patched and "diffusers.models.autoencoders.vae" in patched
    sched_module = type(pipe.scheduler).__module__
    assert "randn_tensor" not in vars(sys.modules[sched_module]) or sched_module in patched
    call = _call_kwargs(steps, **settings)
    call.update(dict(image=IMAGE, strength=strength) if img2img else dict(height=SIZE, width=SIZE))
    with torch.no_grad():
        images = pipe(**call).images
    assert isinstance(images, np.ndarray)
    return images, gen.draws


def run_sdrt(sdrt_pipeline, family, scheduler, steps, *, img2img=False, overrides=None, strength=STRENGTH, seed=0,
             **settings):
    """sdrt's PipelineOutput and the shapes of the noise it drew, in order."""
    gen = RecordingGenerator(seed)
    out = sdrt_pipeline(family)(
        **_call_kwargs(steps, **settings),
        height=SIZE,
        width=SIZE,
        scheduler=scheduler,
        scheduler_config=overrides or None,
        image=IMAGE if img2img else None,
        strength=strength,
        generator=gen,
    )
    return out, gen.draws


def run_pair(reference, sdrt_pipeline, monkeypatch, family, scheduler, steps, **settings):
    """Run one generation through diffusers and sdrt; assert pixel parity and identical noise draws."""
    expected, ref_draws = run_diffusers(reference, monkeypatch, family, scheduler, steps, **settings)
    assert np.isfinite(expected).all()
    out, draws = run_sdrt(sdrt_pipeline, family, scheduler, steps, **settings)
    prompt = settings.get("prompt", PROMPT)
    batch = (1 if isinstance(prompt, str) else len(prompt)) * settings.get("num_images_per_prompt", 1)
    assert out.images.shape == expected.shape == (batch, SIZE, SIZE, 3)
    assert out.images.dtype == np.float32
    err = float(np.abs(out.images - expected).max())
    assert err <= TOL, f"max abs pixel difference {err:.3g} > {TOL}"
    assert draws == ref_draws, "the two pipelines draw noise in different orders or shapes"
    return out, expected


# ---------------------------------------------------------------------------------------------- the grid


def _negative(steps):
    return NEGATIVE if steps in (2, 25) else None


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img(reference, sdrt_pipeline, monkeypatch, family, scheduler, steps):
    run_pair(reference, sdrt_pipeline, monkeypatch, family, scheduler, steps, negative_prompt=_negative(steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_img2img(reference, sdrt_pipeline, monkeypatch, family, scheduler, steps):
    # int(1 * 0.6) = 0 denoising steps: a single step needs strength 1 (see test_img2img_without_steps)
    strength = 1.0 if steps == 1 else STRENGTH
    run_pair(
        reference, sdrt_pipeline, monkeypatch, family, scheduler, steps,
        img2img=True, strength=strength, negative_prompt=_negative(steps),
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_checkpoint_default_scheduler(reference, sdrt_pipeline, monkeypatch, family, img2img):
    run_pair(reference, sdrt_pipeline, monkeypatch, family, None, 5, img2img=img2img)


def test_img2img_without_steps(sdrt_pipeline):
    """strength * steps < 1 leaves nothing to denoise: an error that says what to raise, not a blank image."""
    from sdrt.runtime.pipeline import GenerationError

    with pytest.raises(GenerationError, match="strength"):
        sdrt_pipeline("sd1")(PROMPT, num_inference_steps=1, height=SIZE, width=SIZE, image=IMAGE, strength=0.6)


# ---------------------------------------------------------------------------------------------- config variants

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
VARIANTS = [
    # (id, family, schedulers, overrides, steps, img2img)
    ("spacing-leading", "sd1", ["ddim", "euler"], {"timestep_spacing": "leading"}, 5, False),
    ("spacing-trailing", "sd1", ["ddim", "dpm++2m"], {"timestep_spacing": "trailing"}, 5, False),
    ("spacing-linspace", "sd1", ["euler", "unipc"], {"timestep_spacing": "linspace"}, 5, False),
    ("spacing-trailing-img2img", "sd1", ["euler-a"], {"timestep_spacing": "trailing"}, 5, True),
    ("offset-0", "sd1", ["ddim", "pndm"], {"steps_offset": 0}, 5, False),
    ("v-prediction", "sd2", ["euler", "dpm++2m"], {"prediction_type": "v_prediction"}, 5, False),
    ("v-prediction-img2img", "sd2", ["dpm++2m-sde"], {"prediction_type": "v_prediction"}, 5, True),
    ("epsilon-on-v-model", "sd2", ["ddim"], {"prediction_type": "epsilon"}, 5, False),
    ("clip-sample", "sd1", ["ddim"], {"clip_sample": True}, 5, False),
    ("alpha-to-one", "sd1", ["ddim", "pndm"], {"set_alpha_to_one": True}, 5, False),
    ("final-sigmas-zero", "sd1", ["dpm++2m", "unipc"], {"final_sigmas_type": "zero"}, 5, False),
    # zero terminal SNR is meant for v-prediction (sd2, or sd1 told so); with epsilon prediction Euler and DPM-Solver
    # clamp the last alpha_bar to 2**-24 and stay finite, DDIM divides by zero: test_zero_snr_with_epsilon_prediction
    ("zero-snr-trailing", "sd2", ["ddim", "dpm++2m", "euler-a"], ZERO_SNR, 5, False),
    ("zero-snr-trailing-img2img", "sd2", ["unipc"], ZERO_SNR, 5, True),
    ("zero-snr-trailing-v", "sd1", ["ddim"], {**ZERO_SNR, "prediction_type": "v_prediction"}, 5, False),
    ("zero-snr-trailing-eps", "sd1", ["euler", "dpm++2m"], ZERO_SNR, 5, False),
    ("log-linear", "sd1", ["euler"], {"interpolation_type": "log_linear"}, 5, False),
    ("beta-linear", "sd1", ["ddim", "lms"], {"beta_schedule": "linear"}, 5, False),
    ("beta-linear-img2img", "sd1", ["heun"], {"beta_schedule": "linear"}, 5, True),
]


@pytest.mark.parametrize(
    "family,scheduler,overrides,steps,img2img",
    [pytest.param(f, s, o, n, i, id=f"{vid}-{s}") for vid, f, ss, o, n, i in VARIANTS for s in ss],
)
def test_config_variant(reference, sdrt_pipeline, monkeypatch, family, scheduler, overrides, steps, img2img):
    run_pair(
        reference, sdrt_pipeline, monkeypatch, family, scheduler, steps,
        img2img=img2img, overrides=overrides, negative_prompt=NEGATIVE,
    )


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_zero_snr_with_epsilon_prediction(reference, sdrt_pipeline, monkeypatch):
    """alpha_bar = 0 at t = 999 and epsilon prediction: x0 = (x - eps) / 0. diffusers returns a NaN image;
    sdrt refuses with an error naming the setting."""
    from sdrt.runtime.pipeline import NonFiniteError

    expected, _ = run_diffusers(reference, monkeypatch, "sd1", "ddim", 5, overrides=ZERO_SNR)
    assert np.isnan(expected).all()
    with pytest.raises(NonFiniteError, match="rescale_betas_zero_snr with prediction_type epsilon"):
        run_sdrt(sdrt_pipeline, "sd1", "ddim", 5, overrides=ZERO_SNR)


# ---------------------------------------------------------------------------------------------- batches, guidance


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_num_images_per_prompt(reference, sdrt_pipeline, monkeypatch, family, img2img):
    out, _ = run_pair(
        reference, sdrt_pipeline, monkeypatch, family, "euler-a", 4,
        img2img=img2img, num_images_per_prompt=2, negative_prompt=NEGATIVE,
    )
    assert np.abs(out.images[0] - out.images[1]).max() > 1e-3  # two samples, not one image twice


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_prompt_list_with_negative_prompts(reference, sdrt_pipeline, monkeypatch, family, img2img):
    prompts = [PROMPT, "a watercolor painting of a lighthouse at dusk"]
    negatives = [NEGATIVE, "people, text"]
    run_pair(
        reference, sdrt_pipeline, monkeypatch, family, "dpm++2m-sde", 4,
        img2img=img2img, prompt=prompts, negative_prompt=negatives,
    )
    run_pair(
        reference, sdrt_pipeline, monkeypatch, family, "dpm++2m", 3,
        img2img=img2img, prompt=prompts, negative_prompt=negatives, num_images_per_prompt=2,
    )


class _RecordingUnet:
    def __init__(self, engine):
        self.engine, self.batches, self.time_ids = engine, [], []

    def __call__(self, **inputs):
        self.batches.append(inputs["sample"].shape[0])
        if "time_ids" in inputs:
            self.time_ids.append(inputs["time_ids"].copy())
        assert all(len(v) == self.batches[-1] for v in inputs.values())
        return self.engine(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "scheduler,steps,img2img", [("euler", 5, False), ("heun", 4, False), ("dpm++2m-sde", 5, True)]
)
def test_guidance_one_calls_the_unet_once_per_step(
    reference, sdrt_pipeline, monkeypatch, family, scheduler, steps, img2img
):
    pipe = sdrt_pipeline(family)
    unet = _RecordingUnet(pipe.engine("unet"))
    monkeypatch.setitem(pipe.engines, "unet", unet)
    out, _ = run_pair(
        reference, sdrt_pipeline, monkeypatch, family, scheduler, steps,
        img2img=img2img, guidance_scale=1.0, negative_prompt=NEGATIVE,
    )
    ref_sched = reference(family).scheduler(scheduler, {})
    ref_sched.set_timesteps(steps)
    n_calls = len(ref_sched.timesteps)
    if img2img:
        n_calls -= (steps - int(steps * STRENGTH)) * ref_sched.order
    assert len(out.timings.unet) == n_calls == len(unet.batches)
    assert unet.batches == [1] * n_calls


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_sdxl_time_ids(reference, sdrt_pipeline, monkeypatch, img2img):
    """SDXL micro-conditioning: both sides pass time ids [h, w, 0, 0, h, w] for every row, negatives included.
    (diffusers' img2img pipeline would pass [h, w, 0, 0, aesthetic_score] with requires_aesthetics_score=True,
    the refiner's layout; it defaults to False, and a base UNet's add_embedding only takes six ids.)"""
    seen = []
    unet = reference("sdxl").txt2img.unet  # shared by the img2img pipeline
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].numpy().copy()),
        with_kwargs=True,
    )
    pipe = sdrt_pipeline("sdxl")
    recording = _RecordingUnet(pipe.engine("unet"))
    monkeypatch.setitem(pipe.engines, "unet", recording)
    try:
        run_pair(reference, sdrt_pipeline, monkeypatch, "sdxl", "euler", 3, img2img=img2img, negative_prompt=NEGATIVE)
    finally:
        handle.remove()
    assert not reference("sdxl").img2img.config.requires_aesthetics_score
    expected = np.tile(np.array([SIZE, SIZE, 0, 0, SIZE, SIZE], np.float32), (2, 1))
    assert seen and recording.time_ids and len(seen) == len(recording.time_ids)
    for ref_ids, ids in zip(seen, recording.time_ids):
        np.testing.assert_array_equal(ref_ids, expected)
        np.testing.assert_array_equal(ids, expected)
