"""LoRA without re-export: parity with diffusers' load_lora_weights / set_adapters, both file formats,
and the errors.

Test LoRAs are made here with peft on the test checkpoints: diffusers' ``add_adapter`` on the UNet and
peft's ``inject_adapter_in_model`` on the text encoder(s) (transformers' own add_adapter wants a newer
peft), random B matrices (``init_lora_weights=False``) so the adapter visibly acts, alpha twice the rank
on the UNet (scale 2) and equal to it on the text encoders. They are saved with diffusers'
``save_lora_weights`` (PEFT keys, alphas in the adapter metadata) and converted to kohya's keys with
``convert_state_dict_to_kohya`` (alphas as ``.alpha`` tensors).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from test_parity import single_thread  # noqa: E402,F401

from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.lora import LoraError  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

FAMILIES = ("sd1", "sdxl")
FORMATS = ("diffusers", "kohya")
TOL = 2e-3
STEPS = 3
PROMPT = "a red circle on a blue background"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.2"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # Linear weights only
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _reference_class(path):
    return diffusers.StableDiffusionXLPipeline if (path / "text_encoder_2").is_dir() else diffusers.StableDiffusionPipeline


def make_lora(ckpt, out, seed: int, fmt: str, unet_targets=UNET_TARGETS):
    """A LoRA of the checkpoint in ``fmt``: a diffusers folder, or a kohya .safetensors file."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cls = _reference_class(ckpt)
    pipe = cls.from_pretrained(ckpt, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=unet_targets)
    tcfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(ucfg)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    layers = {"unet": get_peft_model_state_dict(pipe.unet)}
    for name, te in encoders.items():
        if te is not None:
            inject_adapter_in_model(tcfg, te)
            layers[name] = get_peft_model_state_dict(te)
    with torch.no_grad():  # small updates: visible, not overwhelming
        for sd in layers.values():
            for k in sd:
                sd[k].mul_(0.6)
    if fmt == "diffusers":
        meta = {"unet_lora_adapter_metadata": ucfg.to_dict()}
        meta.update({f"{n}_lora_adapter_metadata": tcfg.to_dict() for n in layers if n != "unet"})
        cls.save_lora_weights(out, **{f"{n}_lora_layers": sd for n, sd in layers.items()}, **meta)
        return out
    from safetensors.torch import save_file

    flat = {f"{n}.{k}": v for n, sd in layers.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(flat)
    for k in kohya:
        if k.startswith("lora_unet_") and k.endswith(".alpha"):
            kohya[k] = torch.tensor(8.0)  # alpha 2 x rank, as the diffusers LoRA's metadata says
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out / "lora.safetensors"))
    return out / "lora.safetensors"


@pytest.fixture(scope="module")
def loras(checkpoint, tmp_path_factory):
    cache = {}

    def get(family, fmt, seed, unet_targets=UNET_TARGETS):
        key = (family, fmt, seed, tuple(unet_targets))
        if key not in cache:
            cache[key] = make_lora(checkpoint(family), tmp_path_factory.mktemp(f"lora-{family}-{fmt}-{seed}"), seed, fmt,
                                   unet_targets)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    cache = {}

    def get(family):
        if family not in cache:
            path = checkpoint(family)
            kw = {"add_watermarker": False} if family == "sdxl" else {}
            cache[family] = _reference_class(path).from_pretrained(path, torch_dtype=torch.float32, **kw)
            cache[family].set_progress_bar_config(disable=True)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def pipes(model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Pipeline.load(model_dir(family), backend="ort-cpu", threads=1)
        pipe = cache[family]
        pipe.unload_lora_weights()
        return pipe

    yield get
    for p in cache.values():
        p.close()


def latents_for(pipe, seed=0):
    m = pipe.manifest
    size = m["native_resolution"] // m["vae_scale_factor"]
    return np.random.default_rng(seed).standard_normal((1, m["latent_channels"], size, size), dtype=np.float32)


def run_sdrt(pipe, latents):
    return pipe(PROMPT, num_inference_steps=STEPS, latents=latents, scheduler="ddim", output_type="np").images


def run_diffusers(ref, latents):
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    out = ref(PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np")
    return np.asarray(out.images)


ADAPTERS = {"one at 0.7": ([0], [0.7]), "two together": ([0, 1], [0.7, 0.5])}


@pytest.mark.parametrize("case", list(ADAPTERS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_matches_diffusers(family, fmt, case, loras, reference, pipes, single_thread):
    seeds, weights = ADAPTERS[case]
    ref, pipe = reference(family), pipes(family)
    latents = latents_for(pipe)
    base = run_sdrt(pipe, latents)
    names = [f"a{s}" for s in seeds]
    try:
        for s, n in zip(seeds, names):
            ref.load_lora_weights(str(loras(family, fmt, s)), adapter_name=n)
            pipe.load_lora_weights(loras(family, fmt, s), adapter_name=n)
        ref.set_adapters(names, adapter_weights=weights)
        pipe.set_adapters(names, adapter_weights=weights)
        expected = run_diffusers(ref, latents)
    finally:
        ref.unload_lora_weights()
    got = run_sdrt(pipe, latents)
    err, effect = float(np.abs(got - expected).max()), float(np.abs(expected - base).max())
    print(f"{family} {fmt} {case}: max abs {err:.2e} (the LoRA changes the image by up to {effect:.2f})")
    assert effect > 0.02, "the test LoRA should visibly change the image"
    assert err <= TOL


@pytest.mark.parametrize("targets", ["attention", "with convolutions"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_runs_on_the_optimized_graph(family, targets, loras, reference, pipes, single_thread):
    """Linear weights keep their names in ONNX Runtime's fully optimized (cached) graph; convolution weights
    its NCHWc pass re-laid out under new names are found when the cache is filled (relaid.json) and handed
    over in that layout: a LoRA of either kind runs on the cache, at parity."""
    ref, pipe = reference(family), pipes(family)
    latents = latents_for(pipe)
    lora = loras(family, "diffusers", 2, ATTENTION if targets == "attention" else UNET_TARGETS)
    try:
        ref.load_lora_weights(str(lora))
        expected = run_diffusers(ref, latents)
    finally:
        ref.unload_lora_weights()
    pipe.load_lora_weights(lora)
    assert pipe.engines["unet"].source == "cache"
    got = run_sdrt(pipe, latents)
    print(f"{family} {targets}: max abs {float(np.abs(got - expected).max()):.2e}")
    assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_and_switch(family, loras, pipes, single_thread):
    pipe = pipes(family)
    latents = latents_for(pipe)
    base = run_sdrt(pipe, latents)
    pipe.load_lora_weights(loras(family, "diffusers", 0), adapter_name="a")
    only_a = run_sdrt(pipe, latents)
    pipe.load_lora_weights(loras(family, "kohya", 1), adapter_name="b")
    assert pipe.get_active_adapters() == ["b"]  # loading activates the new adapter alone, as in diffusers
    only_b = run_sdrt(pipe, latents)
    pipe.set_adapters("a")
    np.testing.assert_array_equal(run_sdrt(pipe, latents), only_a)
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert float(np.abs(run_sdrt(pipe, latents) - only_a).max()) < 1e-5
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    assert float(np.abs(run_sdrt(pipe, latents) - base).max()) < 1e-5
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == ["b"] and pipe.get_active_adapters() == ["b"]
    pipe.set_adapters("b")
    np.testing.assert_array_equal(run_sdrt(pipe, latents), only_b)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(run_sdrt(pipe, latents), base)  # the exported weights, exactly


def test_lora_survives_low_memory(model_dir, loras, pipes, single_thread):
    """With low_memory every engine is reopened per call: the adapter must be re-applied to each."""
    pipe = pipes("sd1")
    latents = latents_for(pipe)
    pipe.load_lora_weights(loras("sd1", "diffusers", 0))
    expected = run_sdrt(pipe, latents)
    low = Pipeline.load(model_dir("sd1"), backend="ort-cpu", threads=1, low_memory=True)
    try:
        low.load_lora_weights(loras("sd1", "diffusers", 0))
        for _ in range(2):
            np.testing.assert_array_equal(run_sdrt(low, latents), expected)
    finally:
        low.close()


def test_weight_map_covers_every_linear_and_conv(model_dir, checkpoint):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint("sd1") / "unet")
    wanted = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    mapped = json.loads((model_dir("sd1") / "unet" / "weights.json").read_text())["weights"]
    assert set(mapped) == wanted


# ---------------------------------------------------------------------------------------------- errors


def test_errors(loras, pipes, tmp_path, checkpoint):
    from safetensors.numpy import load_file, save_file

    pipe = pipes("sd1")
    sd1 = loras("sd1", "kohya", 0)
    with pytest.raises(LoraError, match="pickled checkpoint.*safetensors"):
        pipe.load_lora_weights(tmp_path / "lora.ckpt")
    with pytest.raises(LoraError, match="does not exist"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="not a safetensors file"):
        pipe.load_lora_weights(tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match="match no weight of this model.*another family"):
        pipe.load_lora_weights(loras("sdxl", "kohya", 0))
    tensors = load_file(str(sd1))
    key = next(k for k in tensors if k.endswith("lora_down.weight") and "unet" in k)
    tensors[key.replace("lora_down.weight", "dora_scale").replace("lora_unet", "lora_unet")] = tensors[key]
    tensors[key.replace(".lora_down.weight", ".lora_magnitude_vector")] = tensors[key]
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoraError, match="DoRA"):
        pipe.load_lora_weights(tmp_path / "dora.safetensors")
    tensors = load_file(str(sd1))
    tensors[key] = np.zeros((4, 3), np.float32)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraError, match="shape"):
        pipe.load_lora_weights(tmp_path / "shape.safetensors")
    pipe.load_lora_weights(sd1, adapter_name="x")
    with pytest.raises(LoraError, match="already loaded"):
        pipe.load_lora_weights(sd1, adapter_name="x")
    with pytest.raises(LoraError, match="no adapter named 'y'"):
        pipe.set_adapters(["y"])
    with pytest.raises(LoraError, match="2 adapter weights for 1 adapters"):
        pipe.set_adapters(["x"], [0.5, 0.5])
    assert pipe.get_active_adapters() == ["x"]  # a failed call keeps what was loaded


def test_model_without_weight_map_says_reexport(tmp_path, model_dir, loras):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(model_dir("sd1"), copy)
    manifest = json.loads((copy / "sdrt.json").read_text())
    for rec in manifest["components"].values():
        rec.pop("weights", None)
    (copy / "sdrt.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(copy, backend="ort-cpu", threads=1)
    with pytest.raises(LoraError, match="re-export"):
        pipe.load_lora_weights(loras("sd1", "kohya", 0))


def test_older_key_forms_and_transformers4_names(loras, pipes, tmp_path, single_thread):
    """diffusers' older spellings (``lora.down``, attention processors' ``processor.to_q_lora``, the text encoder's
    ``lora_linear_layer.down``, transformers 4.x's ``text_model.`` prefix) load as the PEFT keys do."""
    from safetensors.numpy import load_file, save_file

    pipe = pipes("sd1")
    latents = latents_for(pipe)
    peft_file = loras("sd1", "diffusers", 0) / "pytorch_lora_weights.safetensors"
    pipe.load_lora_weights(peft_file)
    expected = run_sdrt(pipe, latents)
    pipe.unload_lora_weights()
    old = {}
    for k, v in load_file(str(peft_file)).items():
        if k.startswith("unet."):
            k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
            k = k.replace(".attn1.to_q.lora.", ".attn1.processor.to_q_lora.")  # the oldest: attention processors
            k = k.replace(".attn1.to_out.0.lora.", ".attn1.processor.to_out_lora.")
        else:
            k = k.replace("text_encoder.", "text_encoder.text_model.", 1)
            k = k.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(".lora_B.weight", ".lora_linear_layer.up.weight")
        old[k] = v
    meta = dict(__import__("safetensors").safe_open(str(peft_file), "np").metadata() or {})
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    pipe.load_lora_weights(tmp_path / "old.safetensors")
    np.testing.assert_array_equal(run_sdrt(pipe, latents), expected)


def test_cli_lora(model_dir, loras, pipes, tmp_path, single_thread):
    from PIL import Image

    from sdrt.cli import main

    lora = loras("sd1", "kohya", 0)
    out = tmp_path / "cli.png"
    args = ["generate", PROMPT, "--model", str(model_dir("sd1")), "--out", str(out), "--steps", str(STEPS),
            "--scheduler", "ddim", "--seed", "0", "--quiet", "--backend", "ort-cpu"]
    assert main(args + ["--lora", f"{lora}:0.7"]) == 0
    pipe = pipes("sd1")
    pipe.load_lora_weights(lora)
    pipe.set_adapters(["default_0"], [0.7])
    expected = pipe(PROMPT, num_inference_steps=STEPS, scheduler="ddim", seed=0).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(args + ["--lora", str(tmp_path / "nope.safetensors")]) != 0


def _to_sgm(key: str, n: int, with_attentions: set) -> str:
    """kohya's diffusers-named SDXL UNet key in the original (SGM) layout's names, as kohya's sd-scripts write
    SDXL LoRAs; ``n`` resnets per down block; ``with_attentions``: up blocks that have attentions."""
    import re

    stem, dot, tail = key.partition(".")
    body = stem.removeprefix("lora_unet_")
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    rules = [
        (r"down_blocks_(\d+)_resnets_(\d+)_(\w+)", lambda b, l, r: f"input_blocks_{b * (n + 1) + l + 1}_0_{resnet.get(r, r)}"),
        (r"down_blocks_(\d+)_attentions_(\d+)_(\w+)", lambda b, l, r: f"input_blocks_{b * (n + 1) + l + 1}_1_{r}"),
        (r"down_blocks_(\d+)_downsamplers_0_(conv)", lambda b, r: f"input_blocks_{b * (n + 1) + n + 1}_0_op"),
        (r"mid_block_resnets_(\d+)_(\w+)", lambda l, r: f"middle_block_{2 * l}_{resnet.get(r, r)}"),
        (r"mid_block_attentions_0_(\w+)", lambda r: f"middle_block_1_{r}"),
        (r"up_blocks_(\d+)_resnets_(\d+)_(\w+)", lambda b, l, r: f"output_blocks_{b * (n + 1) + l}_0_{resnet.get(r, r)}"),
        (r"up_blocks_(\d+)_attentions_(\d+)_(\w+)", lambda b, l, r: f"output_blocks_{b * (n + 1) + l}_1_{r}"),
        (r"up_blocks_(\d+)_upsamplers_0_(conv)",
         lambda b, r: f"output_blocks_{b * (n + 1) + n}_{2 if b in with_attentions else 1}_conv"),
    ]
    for pattern, name in rules:
        m = re.fullmatch(pattern, body)
        if m:
            args = [int(g) if g.isdigit() else g for g in m.groups()]
            return f"lora_unet_{name(*args)}{dot}{tail}"
    return key


def test_kohya_sdxl_in_sgm_names(loras, reference, pipes, checkpoint, tmp_path, single_thread):
    """kohya's sd-scripts name SDXL UNet modules after the original layout (input_blocks_4_1_...), which
    diffusers maps to its own; sdrt reads them the same."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file, save_file

    config = UNet2DConditionModel.load_config(checkpoint("sdxl") / "unet")
    with_attn = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    kohya = loras("sdxl", "kohya", 0)
    sgm = {_to_sgm(k, config["layers_per_block"], with_attn): v for k, v in load_file(str(kohya)).items()}
    assert any("input_blocks_" in k for k in sgm) and any("output_blocks_" in k for k in sgm)
    save_file(sgm, str(tmp_path / "sgm.safetensors"))
    ref, pipe = reference("sdxl"), pipes("sdxl")
    latents = latents_for(pipe)
    try:
        ref.load_lora_weights(str(tmp_path / "sgm.safetensors"))
        expected = run_diffusers(ref, latents)
    finally:
        ref.unload_lora_weights()
    pipe.load_lora_weights(kohya)
    same_file_in_diffusers_names = run_sdrt(pipe, latents)
    pipe.load_lora_weights(tmp_path / "sgm.safetensors")
    got = run_sdrt(pipe, latents)
    np.testing.assert_array_equal(got, same_file_in_diffusers_names)
    assert float(np.abs(got - expected).max()) <= TOL
