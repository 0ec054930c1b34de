"""ControlNet: `sdrt export --controlnet`, the pipeline's control arguments and their parity with diffusers'
StableDiffusion[XL]ControlNetPipeline, StableDiffusionControlNetImg2ImgPipeline and
StableDiffusionControlNetInpaintPipeline (one and two ControlNets, scales, guidance start/end), the CLI's
--control-image, and TensorRT profiles for the ControlNet graphs (a fake builder, no GPU).

The test ControlNets are ``ControlNetModel.from_unet`` of each test checkpoint's UNet with the zero-initialized
convolutions given random weights (sdrt.export.testing.build_controlnet), so that they change the image: each
parity case also checks that the control image visibly moves the pixels. Noise: diffusers' randn_tensor is
replaced by draws from a numpy Generator (test_parity.patch_randn_tensor) and sdrt gets one with the same seed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_parity import IMAGE, RecordingGenerator, patch_randn_tensor, single_thread  # noqa: E402,F401

from sdrt.export.checkpoint import CheckpointError  # noqa: E402
from sdrt.export.exporter import export_model  # noqa: E402
from sdrt.export.testing import build_controlnet, build_vae  # noqa: E402
from sdrt.runtime.errors import GenerationError  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TOL = 2e-3
EFFECT = 0.02  # the least max-abs pixel change a ControlNet must make, to prove it acts
SIZE = 64
STEPS = 5
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
NAMES = ("edges", "depth")  # the test ControlNets' folder names: their names in the model directory


def control_images(seed: int = 1):
    """Two RGB PIL control images of the call's size: a sharp-edged shape and a smooth gradient."""
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    edges = ((np.abs(x - 0.5) < 0.25) & (np.abs(y - 0.5) < 0.25)).astype(np.float32)
    noise = np.random.default_rng(seed).random((SIZE, SIZE)) * 0.2
    a = np.stack([edges, 1 - edges, edges * 0.5 + noise], axis=-1)
    b = np.stack([x, y, 0.5 * (x + y)], axis=-1)
    return [Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)) for im in (a, b)]


CONTROL = control_images()


@pytest.fixture(scope="module")
def controlnets(checkpoint, tmp_path_factory):
    """family -> [folder of each test ControlNet], made from that family's test checkpoint."""
    root = tmp_path_factory.mktemp("controlnets")

    def get(family):
        out = []
        for seed, name in enumerate(NAMES):
            path = root / family / name
            if not path.is_dir():
                build_controlnet(checkpoint(family), path, seed=seed)
            out.append(path)
        return out

    return get


@pytest.fixture(scope="module")
def model(checkpoint, controlnets, tmp_path_factory):
    """family -> the sdrt model directory exported with both test ControlNets."""
    root = tmp_path_factory.mktemp("controlnet-models")
    cache = {}

    def get(family):
        if family not in cache:
            export_model(checkpoint(family), root / family, controlnets=controlnets(family), log=lambda *_: None)
            cache[family] = root / family
        return cache[family]

    return get


@pytest.fixture(scope="module")
def pipe(model):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Pipeline.load(model(family), backend="ort-cpu", threads=1)
        return cache[family]

    yield get
    for p in cache.values():
        p.close()


def reference(checkpoint, controlnets, family, names, kind="text"):
    """diffusers' ControlNet pipeline of ``kind`` for the checkpoint, with the named test ControlNets (a
    ControlNetModel for one, a list, made a MultiControlNetModel, for several)."""
    folders = {p.name: p for p in controlnets(family)}
    nets = [diffusers.ControlNetModel.from_pretrained(folders[n]) for n in names]
    net = nets[0] if len(nets) == 1 else nets
    if family == "sdxl":
        cls = {"text": diffusers.StableDiffusionXLControlNetPipeline,
               "image": diffusers.StableDiffusionXLControlNetImg2ImgPipeline}[kind]
        ref = cls.from_pretrained(checkpoint(family), controlnet=net, add_watermarker=False)
    else:
        cls = {"text": diffusers.StableDiffusionControlNetPipeline,
               "image": diffusers.StableDiffusionControlNetImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
        ref = cls.from_pretrained(checkpoint(family), controlnet=net, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _pick(names):
    images = [CONTROL[NAMES.index(n)] for n in names]
    return images[0] if len(images) == 1 else images


def run_pair(ref, sdrt_pipe, monkeypatch, names, scheduler="EulerDiscreteScheduler", sdrt_scheduler="euler", *,
             seed=0, **settings):
    """The same ControlNet call through diffusers and sdrt: (sdrt's output, diffusers' images, sdrt's images
    without the control image), after checking parity and the noise draws."""
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    common = dict(num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt=NEGATIVE, output_type="np", **settings)
    images = _pick(names)
    gen = RecordingGenerator(seed)
    patch_randn_tensor(monkeypatch, gen)
    ref_extra = {} if "image" in settings else dict(height=SIZE, width=SIZE)
    with torch.no_grad():
        expected = ref(PROMPT, control_image=images, **common, **ref_extra).images if "image" in settings else \
            ref(PROMPT, image=images, **common, **ref_extra).images
    mine = RecordingGenerator(seed)
    out = sdrt_pipe(PROMPT, control_image=images, controlnet=list(names), scheduler=sdrt_scheduler, generator=mine,
                    height=SIZE, width=SIZE, **common)
    plain = sdrt_pipe(PROMPT, scheduler=sdrt_scheduler, generator=RecordingGenerator(seed), height=SIZE, width=SIZE,
                      **{k: v for k, v in common.items() if not k.startswith("control")})
    err = float(np.abs(out.images - expected).max())
    effect = float(np.abs(out.images - plain.images).max())
    shown = {k: v for k, v in settings.items() if not k.endswith("image")}
    print(f"{'+'.join(names)} {shown}: max abs {err:.2e}, ControlNet effect {effect:.3f}")
    assert out.images.shape == expected.shape
    assert err <= TOL, f"max abs pixel difference {err:.3g} > {TOL}"
    assert mine.draws == gen.draws
    assert effect > EFFECT, f"the ControlNet changed the image by only {effect:.3g}"
    return out, expected, plain


# ---------------------------------------------------------------------------------------------- export


def test_export_records_controlnets_and_keeps_the_plain_unet(model):
    m = json.loads((model("sd1") / "sdrt.json").read_text())
    assert [c["name"] for c in m["controlnets"]] == list(NAMES)
    assert m["controlnet_unet"] == "unet_controlnet"
    unet, controlled = m["components"]["unet"], m["components"]["unet_controlnet"]
    residuals = m["controlnets"][0]["residuals"]
    # sd1 test UNet: conv_in + 2 blocks x 1 resnet + 1 downsampler = 4 down residuals, and the mid block's
    assert [r["name"] for r in residuals][-1] == "mid_block_additional_residual" and len(residuals) == 5
    assert [t["name"] for t in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert controlled["inputs"][3:] == residuals
    for name in NAMES:
        rec = m["components"][f"controlnet.{name}"]
        assert rec["file"] == f"controlnet/{name}/model.onnx" and (model("sd1") / rec["file"]).is_file()
        assert json.loads((model("sd1") / rec["config"]).read_text())["_class_name"] == "ControlNetModel"
        assert rec["outputs"] == residuals and rec["inputs"][-1]["shape"] == ["batch", 3, "height", "width"]
        assert rec["validation"]["max_rel_error"] < 1e-3
    sdxl = json.loads((model("sdxl") / "sdrt.json").read_text())
    assert [t["name"] for t in sdxl["components"]["controlnet.edges"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "controlnet_cond"]


def test_export_refuses_a_controlnet_that_does_not_fit(checkpoint, controlnets, tmp_path):
    out = tmp_path / "out"
    cases = [
        (controlnets("sdxl")[0], r"cross_attention_dim 96 \(the text conditioning's width\), the UNet of .* has 32"),
        (build_vae("kl-vae", tmp_path / "vae"), "holds a AutoencoderKL, not a ControlNetModel"),
        (checkpoint("sd1") / "unet", "holds a UNet2DConditionModel, not a ControlNetModel"),
        (tmp_path / "missing", "does not exist"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            export_model(checkpoint("sd1"), out, controlnets=[path], log=lambda *_: None)
    twin = tmp_path / "other" / NAMES[0]
    shutil.copytree(controlnets("sd1")[0], twin)
    with pytest.raises(CheckpointError, match="would both be named 'edges'"):
        export_model(checkpoint("sd1"), out, controlnets=[controlnets("sd1")[0], twin], log=lambda *_: None)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # refused before anything was written


# ---------------------------------------------------------------------------------------------- parity

TXT2IMG = [
    # (family, ControlNets, settings)
    ("sd1", ("edges",), dict(controlnet_conditioning_scale=0.5)),
    ("sd1", ("edges", "depth"), dict(controlnet_conditioning_scale=[1.0, 0.5],
                                     control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0])),
    ("sdxl", ("edges",), dict(controlnet_conditioning_scale=1.0, control_guidance_start=0.2, control_guidance_end=0.8)),
    ("sdxl", ("depth", "edges"), dict(controlnet_conditioning_scale=[0.5, 1.0])),
]


@pytest.mark.parametrize("family,names,settings", TXT2IMG,
                         ids=[f"{f}-{'+'.join(n)}-{i}" for i, (f, n, _) in enumerate(TXT2IMG)])
def test_text_to_image_matches_diffusers(checkpoint, controlnets, pipe, monkeypatch, family, names, settings):
    ref = reference(checkpoint, controlnets, family, names)
    out, _, _ = run_pair(ref, pipe(family), monkeypatch, names, **settings)
    assert [c["name"] for c in out.parameters["controlnets"]] == list(names)
    assert len(out.timings.controlnet) > 0


def test_second_order_scheduler_counts_steps_as_diffusers(checkpoint, controlnets, pipe, monkeypatch):
    """Heun runs 2n-1 UNet calls; controlnet_keep counts each of them as a step, as diffusers does."""
    ref = reference(checkpoint, controlnets, "sd1", ("depth",))
    out, _, _ = run_pair(ref, pipe("sd1"), monkeypatch, ("depth",), "HeunDiscreteScheduler", "heun",
                         control_guidance_start=0.3, control_guidance_end=0.7)
    assert 0 < len(out.timings.controlnet) < len(out.timings.unet)  # off at some steps: not run there


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_image_to_image_matches_diffusers(checkpoint, controlnets, pipe, monkeypatch, family):
    ref = reference(checkpoint, controlnets, family, ("edges",), kind="image")
    # diffusers' image-to-image ControlNet pipeline defaults to scale 0.8 (inpainting 0.5), sdrt to 1.0 for every task
    run_pair(ref, pipe(family), monkeypatch, ("edges",), image=IMAGE, strength=0.6, controlnet_conditioning_scale=1.0,
             control_guidance_start=0.2, control_guidance_end=0.8)


def test_inpainting_matches_diffusers(checkpoint, controlnets, pipe, monkeypatch):
    from test_inpaint import MASK

    ref = reference(checkpoint, controlnets, "sd1", ("edges", "depth"), kind="inpaint")
    run_pair(ref, pipe("sd1"), monkeypatch, ("edges", "depth"), "DDIMScheduler", "ddim", image=IMAGE,
             mask_image=MASK, strength=0.8, controlnet_conditioning_scale=[0.5, 1.0])


def test_lora_with_controlnet_matches_diffusers(checkpoint, controlnets, pipe, monkeypatch, tmp_path):
    """A LoRA applies to the ControlNet UNet too (its weight map: the UNet's module names), as diffusers'
    load_lora_weights on a ControlNet pipeline changes its UNet."""
    pytest.importorskip("peft")
    from test_lora import make_lora

    lora = make_lora(checkpoint("sd1"), tmp_path / "lora", 0, "kohya")
    ref, sdrt_pipe = reference(checkpoint, controlnets, "sd1", ("edges",)), pipe("sd1")
    ref.load_lora_weights(str(lora))
    sdrt_pipe.load_lora_weights(lora)
    try:
        run_pair(ref, sdrt_pipe, monkeypatch, ("edges",), controlnet_conditioning_scale=0.7)
    finally:
        sdrt_pipe.unload_lora_weights()
        ref.unload_lora_weights()


# ---------------------------------------------------------------------------------------------- the runtime


def test_controlnets_open_lazily_and_default_to_all_in_order(pipe):
    p = Pipeline.load(pipe("sd1").model_dir, backend="ort-cpu", threads=1)
    lazy = [p.engines[c] for c in ("unet_controlnet", "controlnet.edges", "controlnet.depth")]
    assert all(e._engine is None for e in lazy)  # not opened by a call without a control image
    p(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, seed=0)
    assert all(e._engine is None for e in lazy)
    assert p.controlnets == list(NAMES)
    both = p(PROMPT, control_image=CONTROL, num_inference_steps=2, seed=0, output_type="np")
    named = p(PROMPT, control_image=CONTROL, controlnet=list(NAMES), num_inference_steps=2, seed=0, output_type="np",
              height=SIZE, width=SIZE)
    assert both.images.shape == (1, SIZE, SIZE, 3)  # the control image's size, as diffusers
    np.testing.assert_array_equal(both.images, named.images)
    p.close()


def test_control_arguments_are_checked(pipe):
    p = pipe("sd1")
    call = dict(num_inference_steps=2, height=SIZE, width=SIZE)
    cases = [
        (dict(control_image=CONTROL[0]), "1 control image\\(s\\) for 2 ControlNets"),
        (dict(control_image=CONTROL[0], controlnet="canny"), "no ControlNet named 'canny'.*edges, depth"),
        (dict(controlnet="edges"), "controlnet was given without control_image"),
        (dict(control_image=CONTROL[0], controlnet="edges", control_guidance_start=0.8, control_guidance_end=0.2),
         "must be below control_guidance_end"),
        (dict(control_image=CONTROL, controlnet_conditioning_scale=[1.0, 2.0, 3.0]),
         "controlnet_conditioning_scale has 3 entries for 2 ControlNets"),
        (dict(control_image=[CONTROL[0]] * 3, controlnet="edges", prompt=[PROMPT] * 2),
         "3 control images for 2 prompts"),
    ]
    for kwargs, message in cases:
        kwargs = {"prompt": PROMPT, **kwargs}
        with pytest.raises(GenerationError, match=message):
            p(**kwargs, **call)


def test_a_model_without_controlnets_says_how_to_export_one(pipe, monkeypatch):
    p = pipe("sd1")
    monkeypatch.setattr(p, "manifest", {k: v for k, v in p.manifest.items() if not k.startswith("controlnet")})
    with pytest.raises(GenerationError, match="has no ControlNet; export one beside it with .*--controlnet"):
        p(PROMPT, control_image=CONTROL[0], num_inference_steps=2)


def test_cli_control_image_with_names_and_scales(pipe, tmp_path):
    from sdrt.cli import main

    paths = []
    for name, im in zip(NAMES, CONTROL):
        paths.append(tmp_path / f"{name}.png")
        im.save(paths[-1])
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--model", str(pipe("sd1").model_dir), "--out", str(out), "--steps", "3", "--seed", "4",
            "--backend", "ort-cpu", "--quiet"]
    assert main(args + ["--control-image", f"{paths[1]}:depth", "--control-image", f"{paths[0]}:edges",
                        "--control-scale", "0.5", "--control-scale", "1.0"]) == 0
    from PIL import Image

    got = np.asarray(Image.open(out)).astype(np.float32) / 255
    expected = pipe("sd1")(PROMPT, control_image=[CONTROL[1], CONTROL[0]], controlnet=["depth", "edges"],
                           controlnet_conditioning_scale=[0.5, 1.0], num_inference_steps=3, seed=4, output_type="np")
    assert np.abs(got - expected.images[0]).max() <= 1 / 255 + 1e-6
    assert main(args + ["--control-image", f"{paths[0]}:edges", "--control-image", str(paths[1])]) == 1  # names: all or none


# ---------------------------------------------------------------------------------------------- TensorRT


def test_build_makes_controlnet_engines_with_guided_profiles(model, tmp_path):
    from test_tensorrt import FakeBuilder

    from sdrt.export.build import build_engines

    root = tmp_path / "sd1"
    shutil.copytree(model("sd1"), root)
    builder = FakeBuilder()
    rows = build_engines(root, builder=builder, height=64, width=64, min_height=32, max_height=128, min_width=32,
                         max_width=128, max_batch=2, log=lambda *_: None)
    built = {r["component"] for r in rows}
    assert {"unet", "unet_controlnet", "controlnet.edges", "controlnet.depth"} <= built
    profiles = {c["component"]: c["profile"] for c in builder.calls}  # by folder name
    cn, unet = profiles["edges"], profiles["unet_controlnet"]
    assert cn["sample"] == unet["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}
    assert cn["controlnet_cond"] == {"min": [1, 3, 32, 32], "opt": [2, 3, 64, 64], "max": [4, 3, 128, 128]}
    assert unet["mid_block_additional_residual"] == {"min": [1, 64, 2, 2], "opt": [2, 64, 4, 4], "max": [4, 64, 8, 8]}
    m = json.loads((root / "sdrt.json").read_text())
    (key, entry), = m["engines"].items()
    assert entry["components"]["controlnet.edges"]["file"] == f"engines/{key}/controlnet.edges.plan"
    from test_tensorrt import H100

    from sdrt.runtime.backends.tensorrt import tensorrt_records

    usable = tensorrt_records(root, m, strict=True, facts=H100)  # what the tensorrt backend would open
    assert {"unet_controlnet", "controlnet.edges", "controlnet.depth"} <= set(usable)
