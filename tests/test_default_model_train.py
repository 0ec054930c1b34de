"""Smoke test of the default model's training script (export/default_model/train.py): a few seconds per
stage into a temporary directory, then the checkpoint loads with diffusers' StableDiffusionPipeline and
generates a 128x128 image, and exports and generates with sdrt."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_train_smoke(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from sdrt.export.default_model import train

    out = tmp_path / "ckpt"
    rc = train.main(
        ["--out", str(out), "--seed", "0", "--vae-minutes", "0.05", "--unet-minutes", "0.05", "--decoder-minutes", "0.05", "--batch", "2",
         "--n-train", "16", "--eval-n", "2", "--log-every", "5"]
    )
    assert rc == 0
    log = capsys.readouterr().out
    assert "scaling_factor" in log and "eval held_out" in log and "eval train_dist" in log and "decoder done" in log
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        assert (out / sub).is_dir(), sub
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["prediction_type"] == "v_prediction"
    assert sched["rescale_betas_zero_snr"] and sched["timestep_spacing"] == "trailing"
    te_cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert te_cfg["vocab_size"] < 1000  # the trimmed tokenizer's vocabulary, not CLIP's 49408
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and len(vae_cfg["block_out_channels"]) == 4

    before = (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train.main(["--refine-decoder-of", str(out), "--decoder-steps", "2", "--n-train", "8", "--eval-n", "0"]) == 0
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() != before
    assert "decoder done: 2 steps" in capsys.readouterr().out

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert img.shape == (128, 128, 3)
    assert np.isfinite(img).all()

    # and it goes through the same export path as any checkpoint (its text encoder has a trimmed vocabulary)
    from sdrt.export.exporter import export_model
    from sdrt.runtime.pipeline import Pipeline

    model = tmp_path / "model"
    export_model(out, model, log=lambda *_: None)
    ours = Pipeline.load(model)("a red circle on a blue background", num_inference_steps=2, seed=0, output_type="np")
    assert ours.images.shape == (1, 128, 128, 3) and np.isfinite(ours.images).all()


def test_trimmed_tokenizer_tokenizes_every_caption_as_clip_does(tmp_path):
    """The default model's tokenizer keeps only the merges its caption words need: those words get
    CLIP's own tokens, anything else still tokenizes (bytes), never to unknown."""
    from transformers import CLIPTokenizer

    from sdrt.export.default_model import data, train
    from sdrt.export.testing import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "small", train.TOKENIZER_PAD, words=train.vocabulary())
    write_clip_tokenizer(tmp_path / "full", train.TOKENIZER_PAD)
    small = CLIPTokenizer.from_pretrained(tmp_path / "small")
    full = CLIPTokenizer.from_pretrained(tmp_path / "full")
    assert len(small) < 1000 and (small.bos_token_id, small.eos_token_id) == (len(small) - 2, len(small) - 1)
    rng = np.random.default_rng(3)
    texts = data.held_out_prompts(20, 1) + data.train_dist_prompts(20, 1)
    texts += [data.caption(data.sample_scene(rng), rng) for _ in range(200)] + ["A RED Circle, in the middle!"]
    for text in texts:
        assert small.tokenize(text) == full.tokenize(text), text
    ids = small("a zebra 42 ünïcode").input_ids
    assert small.unk_token_id not in ids[1:-1] and len(ids) > 6


def test_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    from sdrt.export.default_model import train

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the error path cannot be reached")
    with pytest.raises(SystemExit) as exc:
        train.main(["--out", str(tmp_path / "ckpt"), "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here): trains a few steps on it")
def test_train_smoke_on_a_gpu(tmp_path):
    from sdrt.export.default_model import train

    out = tmp_path / "ckpt"
    assert train.main(["--out", str(out), "--device", "cuda", "--vae-steps", "3", "--unet-steps", "3",
                       "--decoder-steps", "2", "--batch", "4", "--n-train", "16", "--eval-n", "2"]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sweep_variants_are_valid_and_checkpoints_pack_in_float16(tmp_path, capsys, monkeypatch):
    import sys
    import tarfile

    from safetensors.torch import load_file, save_file

    from sdrt.export.default_model import sweep, train

    for name, (unet, vae, args) in sweep.VARIANTS.items():
        assert set(unet) <= set(train.UNET) | {"in_channels", "out_channels"}, name
        assert set(vae) <= set(train.VAE) | {"latent_channels"}, name
        assert args == [] or args[0].startswith("--"), name
    ckpt = tmp_path / "X"
    (ckpt / "unet").mkdir(parents=True)
    save_file({"w": torch.randn(3, 3), "i": torch.arange(3)}, ckpt / "unet" / "m.safetensors")
    (ckpt / "unet" / "config.json").write_text("{}")
    sweep.pack(ckpt, tmp_path / "X.tgz")
    with tarfile.open(tmp_path / "X.tgz") as tar:
        tar.extractall(tmp_path / "un")
    back = load_file(tmp_path / "un" / "X" / "unet" / "m.safetensors")
    assert back["w"].dtype == torch.float16 and back["i"].dtype == torch.int64
    assert (tmp_path / "un" / "X" / "unet" / "config.json").is_file()
    # float32, split into parts that join back into the same archive
    save_file({"w": torch.randn(200, 200)}, ckpt / "unet" / "big.safetensors")
    parts = sweep.pack(ckpt, tmp_path / "Y.tgz", half=False, part_mib=0.05)
    assert len(parts) > 1 and not (tmp_path / "Y.tgz").exists()
    assert [p.name for p in parts] == [f"Y.tgz.{i:02d}" for i in range(len(parts))]
    (tmp_path / "Y.tgz").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "Y.tgz") as tar:
        tar.extractall(tmp_path / "un2")
    assert load_file(tmp_path / "un2" / "X" / "unet" / "big.safetensors")["w"].dtype == torch.float32
    assert sweep.pack(ckpt, tmp_path / "Z.tgz", part_mib=100) == [tmp_path / "Z.tgz"]

    monkeypatch.setattr(sys, "argv", ["sweep", "--out", str(tmp_path / "o"), "--only", "B_long,nope"])
    with pytest.raises(SystemExit):
        sweep.main()
    assert "unknown variant(s) nope" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cached_caption_tokens_equal_the_tokenizers(tmp_path):
    """The UNet stage's word-cached tokenization gives exactly the tokenizer's padded ids."""
    from transformers import CLIPTokenizer

    from sdrt.export.default_model import data, train
    from sdrt.export.testing import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "tok", train.TOKENIZER_PAD, words=train.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(7)
    texts = [data.caption(data.sample_scene(rng), rng) for _ in range(300)] + data.held_out_prompts(20, 2)
    texts += ["", "  A RED  Circle, in the middle!  ", "red " * 100, "a zebra 42 ünïcode", "it's a-circle...",
              "a-circle... , here", "red\tcircle\non blue", "red\x1fcircle"]
    fast = train.CaptionTokens(tok, check=texts[:10])
    assert torch.equal(fast(texts), train._tokenize(tok, texts))
    assert len(fast.words) < 120  # one entry per distinct word


def test_stage_clock_counts_steps_minutes_and_a_cap():
    from sdrt.export.default_model.train import _Clock

    steps = _Clock(minutes=0.0, steps=3)
    assert not steps.done(2) and steps.done(3) and steps.progress(1) == pytest.approx(1 / 3)
    assert _Clock(minutes=0.0, steps=None).done(0)  # a zero-minute budget is spent at once
    assert not _Clock(minutes=10.0, steps=None).done(10**6)
    assert _Clock(minutes=10.0, steps=10**6, cap_minutes=0.0).done(0)  # the cap wins over the step count
