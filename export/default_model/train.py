"""Train the built-in default text-to-image model on the synthetic scenes of ``data`` (issue 6).

    python -m sdrt.export.default_model.train --out DIR [--seed 0] [--vae-minutes 16] [--unet-minutes 58]
        [--decoder-minutes 5] [--object-weight 2] [--device cpu]

The model is a real Stable Diffusion 1.x arrangement built from diffusers / transformers classes, only
small: a CLIP text encoder (``CLIPTextModel``, 3 layers, width 128) with the CLIP tokenizer trimmed
to the caption vocabulary (639 tokens; every caption word gets CLIP's own tokens, see
``sdrt.export.testing.write_clip_tokenizer``), a cross-attention ``UNet2DConditionModel`` on
16x16x4 latents, an 8x-downsampling ``AutoencoderKL`` (128 px images) and a DPM-Solver++ scheduler
config with zero terminal SNR, v-prediction and trailing timesteps. It is written with
``save_pretrained`` in the diffusers layout with a ``model_index.json``, exactly as
``sdrt.export.testing`` writes its test checkpoints, so ``StableDiffusionPipeline.from_pretrained(DIR)``
loads it and ``sdrt export DIR`` exports it.

Training, on 2 CPU cores by default (about 85 minutes in all) or on a GPU (``--device cuda``), each
stage budgeted by wall clock (``--vae-steps`` / ``--unet-steps`` / ``--decoder-steps`` fix the step
counts instead, for bit-exact reruns on one device). The shipped model is this entry point on a GPU
with ``--vae-minutes 1.0 --vae-batch 32 --unet-minutes 6.8 --batch 512 --unet-lr 2e-3 --n-train 20000
--decoder-minutes 0.3 --decoder-batch 16 --snr-gamma 20`` (README, "The built-in default model"):

1. a training set of ``--n-train`` scenes (``data.make_dataset(allow="train")``: held-out combinations
   never appear) is rendered once;
2. VAE: L1 + L2 reconstruction + a small KL term (``--kl``), first on random 64 px crops (16 scenes
   per step for the price of 4 whole images), then whole images for the last ``--vae-whole-frac``
   (GroupNorm statistics of crops differ from whole images'); the posterior starts near-deterministic.
   The evaluator then scores the VAE's reconstructions of held-out scenes (the UNet's ceiling), and
   the latent scaling factor is set to 1 / (std of the encoded latents), as Stable Diffusion did;
3. the VAE is frozen and the whole set is encoded once (latent means); the UNet and the text encoder
   train jointly on the v-prediction MSE weighted by min(1, gamma / SNR) (``--snr-gamma``, 5; the
   shipped GPU recipe uses 20) and by 1 + ``--object-weight`` (2) on the latent pixels that cover
   objects, with each step drawing a fresh caption of every scene (``data.caption`` varies the
   wording and what is stated) and dropping ~10%
   of captions to "" for classifier-free guidance; AdamW, linear warmup then cosine decay, an EMA of
   the weights (saved);
4. the decoder alone is refined on whole images for ``--decoder-minutes`` (encoder frozen, so the
   UNet's latents keep their meaning; ``--refine-decoder-of CKPT`` runs just this stage on a
   checkpoint), and the reconstruction check runs again;
5. the checkpoint is written and a quick evaluation runs: diffusers' ``StableDiffusionPipeline``
   (DPM-Solver++ 20 steps, guidance 7.5, fixed seed) on held-out prompts and on fully specified prompts
   of training-distribution scenes, scored by ``evaluate.accuracy``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..testing import SMALL_VAE
from . import data, evaluate

# vocab_size and the special token ids come from the trimmed tokenizer (``_text_encoder_config``).
TEXT_ENCODER = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=128,
)
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64, 128],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' SD1 naming: this is the number of heads
    # 4-16 channels per group. One channel per group (32 groups of 32) is instance norm: it strips
    # each channel's mean, which in these flat-coloured scenes is the colour.
    norm_num_groups=8,
)
# Four blocks, so 128 px images give 16x16x4 latents; narrow at full resolution (where a VAE spends
# its time) and without the mid-block attention: flat-coloured shapes need neither. Four channels per
# norm group at the top: with one (16 groups of 16) GroupNorm strips the colour of a flat region and
# reconstructions come out one muddy hue (measured: 19% of backgrounds right vs 100% with 4).
VAE = dict(SMALL_VAE, block_out_channels=[16, 32, 64, 64], norm_num_groups=4, mid_block_add_attention=False)
TOKENIZER_PAD = "<|endoftext|>"
# Zero terminal SNR with v-prediction and trailing timesteps (Lin et al., "Common Diffusion Noise
# Schedules and Sample Steps are Flawed"). With SD 1.5's schedule the most-noised training latent
# still carries its mean, so a model reads the background colour off the initial noise instead of
# the prompt; the first training run (SD 1.5 schedule, epsilon) got 3% of backgrounds right.
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "trained_betas": None,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def _scheduler_config() -> dict:
    return dict(SCHEDULER)


def vocabulary(n_scenes: int = 3000, seed: int = 0) -> set[str]:
    """Every word the caption templates use (the tokenizer is trimmed to these, see ``write_clip_tokenizer``)."""
    rng = np.random.default_rng([seed, 0x70C])
    words: set[str] = set()
    for _ in range(n_scenes):
        scene = data.sample_scene(rng, allow="all")
        for text in (data.caption(scene, rng), data.full_caption(scene)):
            words.update(re.findall(r"[a-z]+", text.lower()))
    return words


def _text_encoder_config(tokenizer) -> dict:
    return dict(
        TEXT_ENCODER,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class _Clock:
    """A stage's budget: a fixed step count when given, else wall-clock minutes; ``cap_minutes``
    (``--cap-minutes``) ends any stage at that wall-clock time even short of its step count."""

    def __init__(self, minutes: float, steps: int | None, cap_minutes: float | None = None):
        self.t0 = time.monotonic()
        self.budget = minutes * 60.0
        self.steps = steps
        self.cap = None if cap_minutes is None else cap_minutes * 60.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def done(self, step: int) -> bool:
        if self.cap is not None and self.elapsed() >= self.cap:
            return True
        if self.steps is not None:
            return step >= self.steps
        return self.elapsed() >= self.budget

    def progress(self, step: int) -> float:
        """Fraction of the stage done (drives the lr schedule)."""
        if self.steps is not None:
            return step / max(self.steps, 1)
        return min(self.elapsed() / max(self.budget, 1e-9), 1.0)


def _lr_at(base: float, step: int, progress: float, warmup: int, final_frac: float = 0.1) -> float:
    w = min(1.0, (step + 1) / max(warmup, 1))
    cos = final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return base * w * cos


def _fmt_loss(v: float | None) -> str:
    return "n/a (no steps)" if v is None else f"{v:.5f}"


class _Stage:
    """One training stage's loop bookkeeping: step budget, lr schedule, the optimizer step with
    gradient clipping, a smoothed loss, the progress bar and the periodic log line."""

    def __init__(self, name: str, params, opt, clock: _Clock, log, log_every: int, smoothing: float):
        from tqdm import tqdm

        self.name, self.params, self.opt, self.clock = name, list(params), opt, clock
        self.log, self.log_every, self.smoothing = log, log_every, smoothing
        self.bar = tqdm(desc=name, unit="step", file=sys.stderr, mininterval=2.0)
        self.step, self.run_loss, self.lr = 0, None, 0.0
        self._run = None  # the smoothed loss, kept on the device between reads

    def running(self) -> bool:
        return not self.clock.done(self.step)

    def set_lr(self, base: float, warmup: int) -> float:
        self.lr = _lr_at(base, self.step, self.clock.progress(self.step), warmup=warmup)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        return self.lr

    SYNC_EVERY = 10  # read the loss back this often: a read waits for the device, so not every step

    def update(self, loss, extra: dict | None = None) -> None:
        """One optimizer step on ``loss``; ``extra`` (name -> scalar tensor) is shown and logged with it."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        v, a = loss.detach(), self.smoothing
        self._run = v if self._run is None else a * self._run + (1 - a) * v
        self.bar.update(1)
        logging = self.step % self.log_every == 0
        if logging or self.step % self.SYNC_EVERY == 0:
            self.run_loss = float(self._run)
            ex = {k: float(t) for k, t in (extra or {}).items()}
            self.bar.set_postfix(loss=f"{self.run_loss:.4f}", **{k: f"{x:.4f}" for k, x in ex.items()},
                                 lr=f"{self.lr:.1e}", refresh=False)
            if logging:
                detail = "".join(f"{k} {x:.5f} " for k, x in ex.items())
                self.log(f"{self.name} step {self.step} ({self.clock.elapsed():.0f}s): loss {self.run_loss:.5f} "
                         f"{detail}lr {self.lr:.2e}")

    def close(self) -> int:
        if self._run is not None:
            self.run_loss = float(self._run)
        self.bar.close()
        self.log(f"{self.name} done: {self.step} steps in {self.clock.elapsed():.0f}s, "
                 f"final loss (ema) {_fmt_loss(self.run_loss)}")
        return self.step


def _to_tensor(images_u8: np.ndarray, device="cpu"):
    import torch

    return torch.from_numpy(images_u8).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def train_vae(images: np.ndarray, args, rng: np.random.Generator, log):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE).to(args.device)
    # Start with a near-deterministic posterior (std e^-4 instead of 1): with unit noise on latents
    # whose means are a few tenths, the decoder first sees mostly noise and learning crawls.
    with torch.no_grad():
        vae.quant_conv.bias[VAE["latent_channels"] :] = -8.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    clock = _Clock(args.vae_minutes, args.vae_steps, args.cap_minutes)
    stage = _Stage("vae", vae.parameters(), opt, clock, log, args.log_every, 0.95)
    while stage.running():
        # Random crops first (many scenes per step: it learns several times faster), whole images at
        # the end: GroupNorm statistics of a crop differ from a whole image's, and a VAE trained on
        # crops alone reconstructs whole images badly.
        whole = args.vae_crop >= data.SIZE or clock.progress(stage.step) >= 1.0 - args.vae_whole_frac
        c = data.SIZE if whole else args.vae_crop
        idx = rng.integers(len(images), size=args.vae_batch)
        if c < data.SIZE:
            oy, ox = rng.integers(0, data.SIZE - c + 1, size=(2, len(idx)))
            batch = np.stack([images[i, y : y + c, x : x + c] for i, y, x in zip(idx, oy, ox)])
        else:
            batch = images[idx]
        x = _to_tensor(batch, args.device)
        stage.set_lr(args.vae_lr, warmup=50)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + l2 + args.kl * kl
        stage.update(loss, extra={"l1": l1.detach(), "l2": l2.detach(), "kl/dim": kl.detach()})
    step = stage.close()
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae, step


def refine_decoder(vae, images: np.ndarray, args, rng: np.random.Generator, log):
    """Stage 3: the decoder alone, on whole images. The encoder stays frozen, so the latents the UNet
    learned keep their meaning; only how they are drawn gets sharper (small shapes' outlines)."""
    import torch

    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99))
    clock = _Clock(args.decoder_minutes, args.decoder_steps, args.cap_minutes)
    stage = _Stage("decoder", params, opt, clock, log, args.log_every, 0.95)
    while stage.running():
        x = _to_tensor(images[rng.integers(len(images), size=args.decoder_batch)], args.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            # a little noise: the UNet's latents are never exactly an encoder's
            z = z + args.decoder_latent_noise * z.std() * torch.randn_like(z)
        stage.set_lr(args.decoder_lr, warmup=20)
        rec = vae.decode(z).sample
        stage.update((rec - x).abs().mean() + ((rec - x) ** 2).mean())
    step = stage.close()
    for p in params:
        p.requires_grad_(False)
    vae.eval()
    return vae, step


def encode_all(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = _to_tensor(images[i : i + batch], vae.device)
            out.append(vae.encode(x).latent_dist.mean.cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _tokenize(tokenizer, texts):
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class CaptionTokens:
    """Captions to padded token ids (as ``_tokenize``), assembled from a per-word cache.

    The tokenizer takes ~220 ms for 128 captions (2-core CPU): on a GPU that was the UNet stage's
    bottleneck (~10 steps/s). CLIP's BPE encodes each pre-token (a run of letters, a digit, a run of
    punctuation) on its own after lower-casing, so a caption's ids are BOS + its words' ids + EOS,
    truncated to ``model_max_length`` and padded. Captions with anything else (digits, apostrophes,
    non-ASCII) go to the tokenizer itself; ``check`` texts are compared with it on construction.
    """

    _PRETOKEN = re.compile(r"[a-z]+|[,.!?;:-]+")
    _PLAIN = re.compile(r"[a-z ,.!?;:-]*")  # plain spaces only: other whitespace takes the tokenizer's path

    def __init__(self, tokenizer, check=()):
        self.tok = tokenizer
        self.n = int(tokenizer.model_max_length)
        self.words: dict[str, list[int]] = {}
        texts = list(check)
        if texts:
            got, want = self(texts), _tokenize(tokenizer, texts)
            bad = [t for t, g, w in zip(texts, got, want) if not bool((g == w).all())]
            if bad:
                raise RuntimeError(f"cached tokenization differs from the tokenizer's on {bad[:3]!r}")

    def _word(self, w: str) -> list[int]:
        ids = self.words.get(w)
        if ids is None:
            ids = self.words[w] = list(self.tok(w, add_special_tokens=False).input_ids)
        return ids

    def __call__(self, texts):
        import torch

        texts = list(texts)
        out = np.full((len(texts), self.n), self.tok.pad_token_id, np.int64)
        slow = []
        for i, text in enumerate(texts):
            low = text.lower()
            if not self._PLAIN.fullmatch(low):
                slow.append(i)
                continue
            ids = [self.tok.bos_token_id] + [t for w in self._PRETOKEN.findall(low) for t in self._word(w)]
            ids = ids[: self.n - 1] + [self.tok.eos_token_id]
            out[i, : len(ids)] = ids
        if slow:
            out[slow] = _tokenize(self.tok, [texts[i] for i in slow]).numpy()
        return torch.from_numpy(out)


class _EMA:
    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    def update(self, step: int):
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def copy_to(self):
        import torch

        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)


def object_weights(images: np.ndarray, scenes, weight: float) -> np.ndarray:
    """(N, 16, 16) loss weights: 1 + ``weight`` on latent pixels that touch an object. The objects are
    a small part of each image; unweighted, the loss is mostly background and the model learns the
    background and the layout long before the objects' colours and shapes."""
    side = data.SIZE // 8
    out = np.ones((len(images), side, side), np.float32)
    for i, (img, scene) in enumerate(zip(images, scenes)):
        bg = np.asarray(data.PALETTE[scene.background], np.float32)
        mask = np.abs(img.astype(np.float32) - bg).max(axis=-1) > 40
        out[i] += weight * mask.reshape(side, 8, side, 8).any(axis=(1, 3))
    return out


def train_unet(latents: np.ndarray, scenes, tokenizer, args, rng: np.random.Generator, log, te=None, unet=None,
               pixel_weights: np.ndarray | None = None):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dev = args.device
    te = (te if te is not None else CLIPTextModel(CLIPTextConfig(**_text_encoder_config(tokenizer)))).to(dev)
    unet = (unet if unet is not None else UNet2DConditionModel(**UNET)).to(dev)
    for p in list(te.parameters()) + list(unet.parameters()):
        p.requires_grad_(True)
    pw = None if pixel_weights is None else torch.from_numpy(pixel_weights).to(dev)
    te.train()
    unet.train()
    noise_sched = DDPMScheduler.from_config(_scheduler_config())
    acp = noise_sched.alphas_cumprod.float().to(dev)
    snr = acp / (1 - acp).clamp_min(1e-12)
    # v-prediction loss weighted by min(1, gamma / SNR): full weight where the picture's layout and
    # colours are decided (high noise, the zero-SNR step included), less on the nearly clean steps.
    # (Hang et al.'s min-SNR weights in their epsilon form; their v form, min(SNR, gamma) / (SNR + 1),
    # would give the pure-noise step no weight at all.)
    loss_w = (args.snr_gamma / snr.clamp_min(1e-12)).clamp(max=1.0)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2, betas=(0.9, 0.99))
    ema = _EMA(params, args.ema) if args.ema > 0 else None
    lat = torch.from_numpy(latents).to(dev)
    check_rng = np.random.default_rng(0)
    tokens = CaptionTokens(tokenizer, check=[""] + [data.caption(scenes[i], check_rng) for i in range(min(64, len(scenes)))])
    clock = _Clock(args.unet_minutes, args.unet_steps, args.cap_minutes)
    stage = _Stage("unet", params, opt, clock, log, args.log_every, 0.98)
    while stage.running():
        idx = rng.integers(len(latents), size=args.batch)
        caps = ["" if rng.random() < args.caption_dropout else data.caption(scenes[i], rng) for i in idx]
        ids = tokens(caps).to(dev)
        tidx = torch.from_numpy(idx).to(dev)
        x0 = lat[tidx] * args.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), device=dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        stage.set_lr(args.unet_lr, warmup=args.warmup)
        cond = te(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        err = F.mse_loss(pred, target, reduction="none").mean(dim=1)
        if pw is not None:
            w = pw[tidx]
            err = err * w / w.mean(dim=(1, 2), keepdim=True)
        loss = (err.mean(dim=(1, 2)) * loss_w[t]).mean()
        stage.update(loss)
        if ema is not None:
            ema.update(stage.step)
    step = stage.close()
    if ema is not None:
        ema.copy_to()
    te.eval()
    unet.eval()
    return te.cpu(), unet.cpu(), step


def save_checkpoint(out: Path, te, unet, vae) -> None:
    out.mkdir(parents=True, exist_ok=True)
    te.save_pretrained(out / "text_encoder")
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    sched = _scheduler_config()
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def generate(ckpt: Path, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 7.5, batch: int = 16,
             device: str = "cpu"):
    """Images (float [0, 1], NHWC numpy) for ``prompts`` from the checkpoint, with diffusers."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ckpt).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        r = pipe(
            prompts[i : i + batch], height=data.SIZE, width=data.SIZE, num_inference_steps=steps,
            guidance_scale=guidance, generator=gen, output_type="np",
        )
        out.append(r.images)
    return np.concatenate(out)


def quick_eval(ckpt: Path, n: int, seed: int, log, device: str = "cpu") -> dict:
    res = {}
    for name, prompts in (("held_out", data.held_out_prompts(n, seed)), ("train_dist", data.train_dist_prompts(n, seed))):
        t = time.monotonic()
        imgs = generate(ckpt, prompts, seed=seed, device=device)
        acc = evaluate.accuracy(imgs, prompts)
        res[name] = acc
        log(f"eval {name} (n={acc['n']}, {time.monotonic() - t:.0f}s): "
            + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "n"))
    return res


def vae_check(vae, n: int, seed: int, log) -> dict:
    """The evaluator on the VAE's reconstructions of held-out ground truth: what the UNet can at best reach."""
    import torch

    scenes = data.held_out_scenes(n, seed)
    gt = np.stack([data.render(s) for s in scenes])
    with torch.no_grad():
        x = _to_tensor(gt, vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    acc = evaluate.accuracy(rec, [data.full_caption(s) for s in scenes])
    log(f"vae reconstruction of {n} held-out scenes: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "n"))
    return acc


def _refine_only(ckpt: Path, args, log) -> int:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ckpt / "vae").to(args.device)
    log(f"rendering {args.n_train} training scenes")
    images, _, _ = data.make_dataset(args.n_train, seed=args.seed, allow="train")
    rng = np.random.default_rng([args.seed, 3])
    if args.eval_n > 0:
        vae_check(vae, args.eval_n, args.seed, log)
    log("stage 3: decoder refinement")
    refine_decoder(vae, images, args, rng, log)
    if args.eval_n > 0:
        vae_check(vae, args.eval_n, args.seed, log)
    vae.cpu().save_pretrained(ckpt / "vae")
    log(f"rewrote {ckpt / 'vae'}; export the checkpoint again (sdrt export) to use it")
    if args.eval_n > 0:
        quick_eval(ckpt, args.eval_n, args.seed, log, device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.export.default_model.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-minutes", type=float, default=16.0)
    ap.add_argument("--unet-minutes", type=float, default=58.0)
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE step count (overrides --vae-minutes)")
    ap.add_argument("--unet-steps", type=int, default=None, help="fixed UNet step count (overrides --unet-minutes)")
    ap.add_argument("--batch", type=int, default=32, help="UNet batch size")
    ap.add_argument("--vae-batch", type=int, default=16, help="VAE batch size (crops, then whole images)")
    ap.add_argument("--vae-crop", type=int, default=64, help="side of the random crops the VAE trains on first")
    ap.add_argument("--vae-whole-frac", type=float, default=0.35,
                    help="final fraction of the VAE stage trained on whole images")
    ap.add_argument("--n-train", type=int, default=6000, help="training scenes rendered (and encoded)")
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--decoder-minutes", type=float, default=5.0, help="stage 3: decoder refinement on whole images")
    ap.add_argument("--decoder-steps", type=int, default=None, help="fixed decoder step count")
    ap.add_argument("--decoder-batch", type=int, default=8)
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--decoder-latent-noise", type=float, default=0.03)
    ap.add_argument("--refine-decoder-of", type=Path, default=None, metavar="CKPT",
                    help="run only stage 3 on an existing checkpoint's VAE (rewritten in place), then evaluate; "
                         "uses --seed, --n-train and the --decoder-* options, nothing else")
    ap.add_argument("--unet-lr", type=float, default=1.5e-3)
    ap.add_argument("--kl", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--snr-gamma", type=float, default=5.0,
                    help="loss weight min(1, gamma / SNR); the shipped GPU recipe uses 20 (held-out shapes 0.88 vs "
                         "0.82 with 5), but with the CPU recipe's 14x fewer samples 20 drew worse shapes and layouts")
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay of the UNet/text-encoder weights (0: off)")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--object-weight", type=float, default=2.0,
                    help="extra UNet loss weight on latent pixels covering objects (0: plain loss)")
    ap.add_argument("--resume", type=Path, default=None, metavar="CKPT",
                    help="continue stage 2 from a checkpoint's text encoder, UNet and VAE (stage 1 skipped), "
                         "then stage 3; writes --out")
    ap.add_argument("--eval-n", type=int, default=32, help="prompts per evaluation set (0: skip)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on (cpu, cuda, cuda:1, ...); the 90-minute budget is for 2 CPU cores")
    ap.add_argument("--cap-minutes", type=float, default=None,
                    help="stop any stage after this many minutes even when a fixed step count is not reached")
    args = ap.parse_args(argv)
    if args.out is None and args.refine_decoder_of is None:
        ap.error("--out is required")

    import torch
    from transformers import CLIPTokenizer

    from ..testing import write_clip_tokenizer

    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.0f}s] {msg}", flush=True)

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: this torch build sees no CUDA GPU; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.refine_decoder_of is not None:
        return _refine_only(args.refine_decoder_of, args, log)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(out / "tokenizer", TOKENIZER_PAD, words=vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    log(f"rendering {args.n_train} training scenes")
    images, _, scenes = data.make_dataset(args.n_train, seed=args.seed, allow="train")
    te = unet = None
    if args.resume is not None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        log(f"resuming from {args.resume}")
        vae = AutoencoderKL.from_pretrained(args.resume / "vae").to(args.device).eval()
        for p in vae.parameters():
            p.requires_grad_(False)
        te = CLIPTextModel.from_pretrained(args.resume / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(args.resume / "unet")
        rng = np.random.default_rng([args.seed, 2])  # fresh draws, not the first run's again
        latents = encode_all(vae, images)
        args.scaling_factor = float(vae.config.scaling_factor)
    else:
        log("stage 1: VAE")
        vae, _ = train_vae(images, args, rng, log)
        if args.eval_n > 0:
            vae_check(vae, args.eval_n, args.seed, log)
        log("encoding the training set")
        latents = encode_all(vae, images)
        std = float(latents.std())
        args.scaling_factor = 1.0 / std
        vae.register_to_config(scaling_factor=args.scaling_factor)
        log(f"latent mean {float(latents.mean()):.4f} std {std:.4f} -> scaling_factor {args.scaling_factor:.5f}")

    log("stage 2: UNet + text encoder")
    weights = object_weights(images, scenes, args.object_weight) if args.object_weight > 0 else None
    te, unet, _ = train_unet(latents, scenes, tokenizer, args, rng, log, te=te, unet=unet, pixel_weights=weights)
    del latents
    if args.decoder_minutes > 0 or args.decoder_steps:
        log("stage 3: decoder refinement")
        refine_decoder(vae, images, args, rng, log)
        if args.eval_n > 0:
            vae_check(vae, args.eval_n, args.seed, log)
    del images
    save_checkpoint(out, te, unet, vae.cpu())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    if args.eval_n > 0:
        quick_eval(out, args.eval_n, args.seed, log, device=args.device)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
