"""The VAE: tiled decode and encode (``pipe.enable_vae_tiling()``) against diffusers' ``vae.enable_tiling()``,
another VAE at export (``sdrt export --vae DIR``: an AutoencoderKL or an AutoencoderTiny) against diffusers'
pipelines given the same ``vae=``, and ``--vae`` folders that are not a VAE.

Noise is shared as in test_parity (diffusers' randn_tensor draws from a numpy Generator; sdrt gets one with the
same seed), and the order and shapes of the draws are compared: an AutoencoderTiny's encoder draws nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_parity import PROMPT, SIZE, TOL, RecordingGenerator, patch_randn_tensor, single_thread  # noqa: E402,F401

from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.stages import run_single  # noqa: E402
from sdrt.runtime.vae import Vae  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

STEPS = 3
STRENGTH = 0.6
VAE_CLASSES = {"kl-vae": "AutoencoderKL", "taesd": "AutoencoderTiny"}


def smooth_image(h: int, w: int, seed: int = 7) -> np.ndarray:
    """A (1, h, w, 3) float image in [0, 1] with structure at every scale, so tiles see different content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / 64
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0.5 * (x * y % 1)], axis=-1)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0.0, 1.0).astype(np.float32)[None]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory):
    """vae_folder(kind) -> a test VAE folder (python -m sdrt.export.testing kl-vae|taesd)."""
    from sdrt.export.testing import build_vae

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build_vae(kind, tmp_path_factory.mktemp(f"vae-{kind}"), seed=1)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def model_with_vae(tmp_path_factory, checkpoint, vae_folder):
    """model_with_vae(kind) -> the sd1 test checkpoint exported with ``--vae`` that VAE."""
    from sdrt.export.exporter import export_model

    cache = {}

    def get(kind):
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"model-{kind}") / "model"
            export_model(checkpoint("sd1"), out, vae=vae_folder(kind), log=lambda *_: None)
            cache[kind] = out
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def pipelines(model_dir, model_with_vae):
    """pipelines(vae) -> sdrt's Pipeline of sd1 with its own VAE (None) or a test VAE."""
    cache = {}

    def get(vae=None):
        if vae not in cache:
            cache[vae] = Pipeline.load(model_dir("sd1") if vae is None else model_with_vae(vae), backend="ort-cpu", threads=1)
        return cache[vae]

    yield get
    for pipe in cache.values():
        pipe.close()


@pytest.fixture(scope="module")
def references(checkpoint, vae_folder):
    """references(vae) -> (text-to-image, image-to-image, inpainting) diffusers pipelines of sd1 sharing one
    VAE: the checkpoint's own (None), or the test VAE given as ``vae=``."""
    cache = {}

    def get(vae=None):
        if vae not in cache:
            kwargs = {} if vae is None else {"vae": getattr(diffusers, VAE_CLASSES[vae]).from_pretrained(vae_folder(vae))}
            t2i = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint("sd1"), torch_dtype=torch.float32, **kwargs)
            i2i = diffusers.StableDiffusionImg2ImgPipeline(**t2i.components, requires_safety_checker=False)
            inp = diffusers.StableDiffusionInpaintPipeline(**t2i.components, requires_safety_checker=False)
            for p in (t2i, i2i, inp):
                p.set_progress_bar_config(disable=True)
            cache[vae] = (t2i, i2i, inp)
        return cache[vae]

    return get


def run_pair(references, pipelines, monkeypatch, *, vae=None, task="txt2img", size=SIZE, tiling=False, **extra):
    """One generation through diffusers and sdrt with the same VAE and tiling; asserts pixel parity and the
    same noise draws; returns sdrt's image."""
    t2i, i2i, inp = references(vae)
    ref = {"txt2img": t2i, "img2img": i2i, "inpaint": inp}[task]
    (ref.vae.enable_tiling if tiling else ref.vae.disable_tiling)()
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np", **extra)
    if task == "txt2img":
        call.update(height=size, width=size)
    else:
        call.update(image=smooth_image(size, size), strength=STRENGTH)
    if task == "inpaint":
        from PIL import Image

        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : 3 * size // 4, size // 3 :] = 255
        call.update(mask_image=Image.fromarray(mask, mode="L"), height=size, width=size)
    ref_gen = RecordingGenerator(0)
    patch_randn_tensor(monkeypatch, ref_gen)
    with torch.no_grad():
        expected = ref(**call).images
    assert expected.std() > 0.05, "the reference image is flat: parity would prove nothing"
    pipe = pipelines(vae)
    (pipe.enable_vae_tiling if tiling else pipe.disable_vae_tiling)()
    gen = RecordingGenerator(0)
    try:
        out = pipe(**dict(call, height=size, width=size), generator=gen)  # (diffusers' img2img: the image's size)
    finally:
        pipe.disable_vae_tiling()
    err = np.abs(out.images - expected)
    print(f"parity vae={vae} {task} {size}px tiling={tiling}: max {err.max():.2e}")  # pytest -s | grep ^parity
    assert out.images.shape == expected.shape
    assert float(err.max()) <= TOL, f"max abs pixel difference {err.max():.3g} > {TOL}"
    assert gen.draws == ref_gen.draws, "the two pipelines draw noise in different orders or shapes"
    return out


# ---------------------------------------------------------------------------------------------- tiling


@pytest.mark.slow
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_tiling_matches_diffusers_at_twice_the_native_size(references, pipelines, monkeypatch, task):
    """sd1's VAE has sample_size 128 (16 latents): at 256 pixels diffusers decodes (and encodes) 3 x 3 tiles."""
    native = pipelines().manifest["native_resolution"]
    out = run_pair(references, pipelines, monkeypatch, task=task, size=2 * native, tiling=True)
    assert out.parameters["vae_tiling"] is True


@pytest.mark.slow
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_tiling_uses_the_given_vaes_tile_size(references, pipelines, monkeypatch, task):
    """The --vae AutoencoderKL has sample_size 64: at the model's native 128 pixels it is tiled, its own way."""
    assert pipelines("kl-vae").vae.tile_sample == 64
    run_pair(references, pipelines, monkeypatch, vae="kl-vae", task=task, size=128, tiling=True)


def test_tiling_changes_the_image_only_above_one_tile(pipelines):
    """Below the tile size tiling is off in diffusers (the decode is the untiled one exactly); above it the seams
    are blended, which differs from decoding the whole (so the parity tests above do test tiling)."""
    pipe = pipelines()
    rng = np.random.default_rng(0)
    for latent_size, same in ((16, True), (24, False)):
        z = rng.standard_normal((1, 4, latent_size, latent_size), dtype=np.float32)
        dec = lambda x: run_single(pipe, "vae_decoder", x)  # noqa: E731
        whole, tiled = pipe.vae.decode(dec, z), pipe.vae.decode(dec, z, tiled=True)
        assert np.array_equal(whole, tiled) == same
        if not same:
            assert np.abs(whole - tiled).max() > 1e-2


@pytest.mark.parametrize("shape", [(2, 40, 24), (1, 17, 33)], ids=["batch2-40x24", "odd-17x33"])
def test_tiled_kl_decode_matches_diffusers_on_uneven_tiles(checkpoint, pipelines, shape):
    """Edge tiles smaller than the blend, non-square latents, a batch: AutoencoderKL.tiled_decode exactly."""
    b, h, w = shape
    vae = diffusers.AutoencoderKL.from_pretrained(checkpoint("sd1") / "vae").eval()
    vae.enable_tiling()
    pipe = pipelines()
    z = np.random.default_rng(1).standard_normal((b, 4, h, w), dtype=np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.numpy()
    got = pipe.vae.decode(lambda x: run_single(pipe, "vae_decoder", x), z, tiled=True)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() / 2 <= TOL  # in [0, 1] pixels


@pytest.mark.slow
def test_tiny_vae_tiling_matches_diffusers(vae_folder, pipelines):
    """AutoencoderTiny tiles 512 pixels (64 latents) with an eighth's overlap, for any size once on: decode and
    encode at 640 x 576 (2 x 2 tiles) against diffusers' AutoencoderTiny with enable_tiling()."""
    vae = diffusers.AutoencoderTiny.from_pretrained(vae_folder("taesd")).eval()
    vae.enable_tiling()
    pipe = pipelines("taesd")
    z = np.random.default_rng(2).standard_normal((1, 4, 72, 80), dtype=np.float32)
    image = smooth_image(576, 640).transpose(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(z)).sample.numpy()
        encoded = vae.encode(torch.from_numpy(image)).latents.numpy()
    got = pipe.vae.decode(lambda x: run_single(pipe, "vae_decoder", x), z, tiled=True)
    assert np.abs(got - decoded).max() / 2 <= TOL
    assert np.abs(got - pipe.vae.decode(lambda x: run_single(pipe, "vae_decoder", x), z)).max() > 1e-3  # seams blended
    latents = pipe.vae.encode(lambda x: run_single(pipe, "vae_encoder", x), image, rng=None, tiled=True)
    assert latents.shape == encoded.shape
    assert np.abs(latents - encoded).max() <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_tiny_vae_tiling_through_the_pipeline(references, pipelines, monkeypatch, task):
    run_pair(references, pipelines, monkeypatch, vae="taesd", task=task, tiling=True)


def test_models_exported_before_the_vae_record_tile_at_their_native_size(pipelines):
    manifest = {k: v for k, v in pipelines().manifest.items() if k != "vae"}
    vae = Vae.from_manifest(manifest)
    assert (vae.kind, vae.tile_sample, vae.tile_latent, vae.overlap) == ("AutoencoderKL", 128, 16, 0.25)


# ---------------------------------------------------------------------------------------------- --vae


@pytest.mark.slow
@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("vae", list(VAE_CLASSES))
def test_another_vae_matches_diffusers_given_the_same_vae(references, pipelines, monkeypatch, vae, task):
    run_pair(references, pipelines, monkeypatch, vae=vae, task=task)


@pytest.mark.parametrize("kind", list(VAE_CLASSES))
def test_the_manifest_records_which_vae(model_with_vae, vae_folder, kind):
    m = json.loads((model_with_vae(kind) / "sdrt.json").read_text())
    config = json.loads((vae_folder(kind) / "config.json").read_text())
    assert m["vae"]["class"] == VAE_CLASSES[kind]
    assert m["vae"]["source"] == str(vae_folder(kind).absolute())
    assert m["vae_scaling_factor"] == config["scaling_factor"]
    if kind == "taesd":
        assert (m["vae_scaling_factor"], m["vae"]["latent_shift"], m["vae"]["latent_magnitude"]) == (1.0, 0.5, 3.0)
        assert [o["name"] for o in m["components"]["vae_encoder"]["outputs"]] == ["latents"]
        assert m["components"]["vae_encoder"]["outputs"][0]["shape"][1] == config["latent_channels"]
    else:
        assert m["vae"]["tiling"] == {"sample_size": 64, "latent_size": 8, "overlap": 0.25}


def test_a_pipeline_folder_gives_its_vae(checkpoint):
    from sdrt.export.checkpoint import inspect_vae

    root, config = inspect_vae(checkpoint("sd1"))
    assert root == checkpoint("sd1") / "vae" and config["_class_name"] == "AutoencoderKL"


def _bad_vae_folders(base, checkpoint, vae_folder):
    """(id, --vae path, expected message) for folders that are not a VAE this model can take."""
    import shutil

    no_config = base / "no-config"
    no_config.mkdir()
    (no_config / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    wide = base / "wide-latents"
    shutil.copytree(vae_folder("kl-vae"), wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(config, latent_channels=16)))
    return [
        ("missing", base / "nowhere", r"--vae .*nowhere does not exist"),
        ("file", vae_folder("kl-vae") / "config.json", r"--vae .*config.json is a file; give a diffusers VAE folder"),
        ("no-config", no_config, r"--vae .*no-config is not a diffusers VAE folder: config.json is missing"),
        ("a-unet", checkpoint("sd1") / "unet", r"--vae .*unet holds a UNet2DConditionModel, not a VAE; sdrt takes an "
                                               r"AutoencoderKL or an AutoencoderTiny folder"),
        ("latent-channels", wide, r"--vae .*wide-latents makes latents of 16 channels, but the UNet of .* takes 4 input "
                                  r"channels \(latents of 4\); give a VAE made for this model's latent space"),
    ]


def test_a_vae_folder_that_is_not_one_is_refused_in_one_line_and_nothing_is_written(
        tmp_path, checkpoint, vae_folder, capsys):
    import re

    from sdrt.cli import main

    out_parent = tmp_path / "out"
    out_parent.mkdir()
    for name, path, message in _bad_vae_folders(tmp_path, checkpoint, vae_folder):
        rc = main(["export", str(checkpoint("sd1")), "--vae", str(path), "--out", str(out_parent / "model")])
        err = capsys.readouterr().err.strip()
        assert rc == 1, name
        assert len(err.splitlines()) == 1 and err.startswith("sdrt export: error: "), (name, err)
        assert re.search(message, err), (name, err)
        assert list(out_parent.iterdir()) == [], name


def test_cli_vae_tiling_is_recorded_in_the_png(model_dir, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.runtime.images import read_parameters

    out = tmp_path / "tiled.png"
    rc = main(["generate", PROMPT, "--model", str(model_dir("sd1")), "--steps", "1", "--seed", "0", "--quiet",
               "--height", "192", "--width", "128", "--vae-tiling", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert read_parameters(out)["vae_tiling"] is True
    again = tmp_path / "again.png"  # --from-png tiles again: the same pixels
    assert main(["generate", "--from-png", str(out), "--model", str(model_dir("sd1")), "--quiet", "--out", str(again)]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
