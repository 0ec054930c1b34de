"""Smoke test of the default model's training script (export/default_model/train.py): a few seconds per
stage into a temporary directory, then the checkpoint loads with diffusers' StableDiffusionPipeline and
generates a 128x128 image."""

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
        ["--out", str(out), "--seed", "0", "--vae-minutes", "0.05", "--unet-minutes", "0.05", "--batch", "2",
         "--n-train", "16", "--eval-n", "2", "--log-every", "5"]
    )
    assert rc == 0
    log = capsys.readouterr().out
    assert "scaling_factor" in log and "eval held_out" in log and "eval train_dist" in log
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        assert (out / sub).is_dir(), sub
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler" and sched.get("prediction_type", "epsilon") == "epsilon"
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and len(vae_cfg["block_out_channels"]) == 4

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert img.shape == (128, 128, 3)
    assert np.isfinite(img).all()
