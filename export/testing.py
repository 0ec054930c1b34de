"""Random-weight Stable Diffusion checkpoints in the diffusers layout, built from configs.

No model hub is reachable where sdrt is developed and tested, and none is needed: diffusers and
transformers construct every model from a config, so a checkpoint with the real architecture
(or a small one of the same arrangement) can be written locally with ``save_pretrained``.

    python -m sdrt.export.testing sd1 /tmp/sd1 [--seed 0]

Families: ``sd1``, ``sd2`` (v-prediction, OpenCLIP-style text encoder), ``sdxl`` (two text encoders,
text_time embeddings) are small (an export takes seconds); ``sd1-inpaint``, ``sd2-inpaint`` and
``sdxl-inpaint`` are the same with an inpainting UNet (9 input channels: latents, mask, masked-image
latents) under diffusers' inpainting pipeline classes; ``sd1-full`` has the real Stable Diffusion
1.5 sizes (UNet ~860M parameters) and ``sdxl-full`` SDXL base 1.0's (UNet 2.6B parameters, CLIP ViT-L and
OpenCLIP ViT-bigG text encoders) for export and benchmark work at scale. Each component is made, written in
shards of at most 2 GB and released before the next is made, so that building ``sdxl-full`` needs its largest
component (the UNet, 10.3 GB) in memory once, not the whole model.

A ControlNet folder, for ``sdrt export CHECKPOINT --controlnet DIR``: ``controlnet --from CHECKPOINT``
(``ControlNetModel.from_unet`` of the checkpoint's UNet, its zero-initialized convolutions given random weights
so that it acts; SD 1.x/2.x and SDXL alike).

VAE folders alone, for ``sdrt export CHECKPOINT --vae DIR``: ``kl-vae`` (a small AutoencoderKL other than
the checkpoints' own: other weights, scaling factor and tile size, as an fp16-safe VAE would be),
``taesd`` (a small AutoencoderTiny) and ``taesd-full`` (AutoencoderTiny at TAESD's real size).

Tokenizers use the real CLIP BPE vocabulary (49408 tokens). It ships inside the open_clip_torch
wheel (install it with ``pip install --no-deps open_clip_torch``: its dependencies would replace torch);
the file is read from there without importing open_clip.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from .tokenizer_files import write_classic_files

FAMILIES = ("sd1", "sd2", "sdxl", "sd1-inpaint", "sd2-inpaint", "sdxl-inpaint", "sdxl-refiner", "sd1-full", "sdxl-full")
SHARD_SIZE = "2GB"  # save_pretrained's max_shard_size: a component is written (and its bytes copied) a shard at a time
VAES = ("kl-vae", "taesd", "taesd-full")
CONTROLNET = "controlnet"
INPAINT_SUFFIX = "-inpaint"

# The scheduler configs exactly as the public checkpoints ship them.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# A small VAE that still downsamples by 8 (four blocks), so latent shapes are the real ones.
SMALL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=128,
)


def _clip_text(hidden, layers, act, pad_token_id, projection_dim=None, heads=4):
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


# model_index.json entries beside the components', as the public checkpoints have them.
SD_INDEX = dict(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
SDXL_INDEX = dict(
    text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
    tokenizer_2=["transformers", "CLIPTokenizer"],
    force_zeros_for_empty_prompt=True,
)
# diffusers' inpainting pipeline for each text-to-image one, and what its model_index adds
# (diffusers/stable-diffusion-xl-1.0-inpainting-0.1: no aesthetic score, unlike the refiner).
INPAINT_PIPELINES = {
    "StableDiffusionPipeline": ("StableDiffusionInpaintPipeline", {}),
    "StableDiffusionXLPipeline": ("StableDiffusionXLInpaintPipeline", {"requires_aesthetics_score": False}),
}


def family_spec(family: str) -> dict:
    """Configs of every component of a test checkpoint of ``family``, its pipeline class and model_index extras."""
    if family.endswith(INPAINT_SUFFIX):
        spec = family_spec(family[: -len(INPAINT_SUFFIX)])
        pipeline, extra = INPAINT_PIPELINES[spec["pipeline"]]
        # latents + mask + masked-image latents, as diffusers' inpainting UNets take them
        unet = dict(spec["unet"], in_channels=2 * spec["vae"]["latent_channels"] + 1)
        return dict(spec, unet=unet, pipeline=pipeline, model_index={**spec["model_index"], **extra})
    if family == "sd1":
        return dict(
            text_encoder=_clip_text(32, 3, "quick_gelu", 49407),
            tokenizer_pad="<|endoftext|>",
            unet=dict(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=[32, 64],
                layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=32,
                attention_head_dim=4,
                norm_num_groups=32,
            ),
            vae=dict(SMALL_VAE, scaling_factor=0.18215),
            scheduler=SD15_SCHEDULER,
            pipeline="StableDiffusionPipeline",
            model_index=SD_INDEX,
        )
    if family == "sd2":
        return dict(
            text_encoder=_clip_text(32, 3, "gelu", 0),
            tokenizer_pad="!",
            unet=dict(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=[32, 64],
                layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=32,
                attention_head_dim=[2, 4],
                use_linear_projection=True,
                upcast_attention=True,
                norm_num_groups=32,
            ),
            vae=dict(SMALL_VAE, scaling_factor=0.18215),
            scheduler=SD21_SCHEDULER,
            pipeline="StableDiffusionPipeline",
            model_index=SD_INDEX,
        )
    if family == "sdxl":
        return dict(
            text_encoder=_clip_text(32, 3, "quick_gelu", 49407),
            text_encoder_2=_clip_text(64, 3, "gelu", 0, projection_dim=32),
            tokenizer_pad="<|endoftext|>",
            tokenizer_2_pad="!",
            unet=dict(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=[32, 64],
                layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=96,  # 32 + 64: both encoders' hidden states concatenated
                attention_head_dim=[2, 4],
                use_linear_projection=True,
                transformer_layers_per_block=[1, 2],
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled embedding
                norm_num_groups=32,
            ),
            vae=dict(SMALL_VAE, scaling_factor=0.13025, force_upcast=True),
            scheduler=SDXL_SCHEDULER,
            pipeline="StableDiffusionXLPipeline",
            model_index=SDXL_INDEX,
        )
    if family == "sdxl-refiner":
        # the SDXL test model's second text encoder and VAE (as the real refiner shares the base's), its own
        # UNet: cross-attention on that encoder alone, five time ids (the aesthetic score for the target size)
        base = family_spec("sdxl")
        return dict(
            text_encoder_2=base["text_encoder_2"],
            tokenizer_2_pad=base["tokenizer_2_pad"],
            unet=dict(base["unet"], cross_attention_dim=64, projection_class_embeddings_input_dim=5 * 8 + 32),
            vae=base["vae"],
            scheduler=SDXL_SCHEDULER,
            pipeline="StableDiffusionXLImg2ImgPipeline",
            model_index=dict(SDXL_INDEX, text_encoder=[None, None], tokenizer=[None, None],
                             requires_aesthetics_score=True, force_zeros_for_empty_prompt=False),
        )
    if family == "sd1-full":
        return dict(
            # CLIP ViT-L/14 text tower, as runwayml/stable-diffusion-v1-5 ships it.
            text_encoder=_clip_text(768, 12, "quick_gelu", 49407, projection_dim=768, heads=12),
            tokenizer_pad="<|endoftext|>",
            unet=dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                block_out_channels=[320, 640, 1280, 1280],
                layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=768,
                attention_head_dim=8,
                norm_num_groups=32,
            ),
            vae=dict(
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512],
                layers_per_block=2,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=512,
                scaling_factor=0.18215,
            ),
            scheduler=SD15_SCHEDULER,
            pipeline="StableDiffusionPipeline",
            model_index=SD_INDEX,
        )
    if family == "sdxl-full":
        # stabilityai/stable-diffusion-xl-base-1.0's configs: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with the
        # projection) text towers, the 2.6B-parameter UNet, the SD VAE at 1024 pixels
        return dict(
            text_encoder=_clip_text(768, 12, "quick_gelu", 1, projection_dim=768, heads=12),
            text_encoder_2=_clip_text(1280, 32, "gelu", 1, projection_dim=1280, heads=20),
            tokenizer_pad="<|endoftext|>",
            tokenizer_2_pad="!",
            unet=dict(
                sample_size=128,
                in_channels=4,
                out_channels=4,
                block_out_channels=[320, 640, 1280],
                layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=2048,
                attention_head_dim=[5, 10, 20],
                use_linear_projection=True,
                transformer_layers_per_block=[1, 2, 10],
                addition_embed_type="text_time",
                addition_embed_type_num_heads=64,
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,  # six time ids x 256 + the 1280-wide pooled embedding
                norm_num_groups=32,
            ),
            vae=dict(family_spec("sd1-full")["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
            scheduler=SDXL_SCHEDULER,
            pipeline="StableDiffusionXLPipeline",
            model_index=SDXL_INDEX,
        )
    raise ValueError(f"unknown test family {family!r}; choose one of {', '.join(FAMILIES)}")


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped in the open_clip_torch wheel (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if p.is_file():
                return p
    raise FileNotFoundError(
        "the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found; "
        "install it with: pip install --no-deps open_clip_torch"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-tokenized word (its bytes already mapped to unicode)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda pr: ranks.get(pr, 1 << 30))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def write_clip_tokenizer(out_dir: Path, pad_token: str, words: Iterable[str] | None = None) -> None:
    """Write the CLIP tokenizer (tokenizer.json, vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) as openai/clip-vit-large-patch14 has it, whichever transformers is installed.

    With ``words`` (texts split into CLIP's pre-tokens: runs of letters, single digits, runs of other
    symbols), the vocabulary is trimmed to the 512 byte-level tokens, the merges CLIP applies to
    those pre-tokens (in CLIP's order) and the two special tokens: the given words tokenize exactly as
    with the full tokenizer, any other text still tokenizes (into smaller pieces, never to unknown),
    and a text encoder needs a few hundred embedding rows instead of 49408. Ids are renumbered densely.
    """
    from transformers import CLIPTokenizerFast

    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_encoder = _bytes_to_unicode()
    byte_chars = list(byte_encoder.values())
    if words is not None:
        ranks = {m: i for i, m in enumerate(merges)}
        keep: set[tuple[str, str]] = set()
        for w in {t for text in words for t in re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower())}:
            if w:
                keep.update(_bpe_merges_used("".join(byte_encoder[b] for b in w.lower().encode("utf-8")), ranks))
        merges = [m for m in merges if m in keep]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert words is not None or len(vocab) == 49408, len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
        )
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        tok = CLIPTokenizerFast.from_pretrained(tmp, pad_token=pad_token, model_max_length=77)
        tok.save_pretrained(out_dir)
    # transformers 5 saves tokenizer.json alone; the classic files too, as a Hub checkpoint has them
    write_classic_files(Path(out_dir) / "tokenizer.json", Path(out_dir), bos_token=tok.bos_token, eos_token=tok.eos_token,
                        unk_token=tok.unk_token, pad_token=pad_token, model_max_length=77)


def build_checkpoint(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight diffusers checkpoint of ``family`` to ``out_dir``; deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401  (diffusers import check)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = family_spec(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        if "text_encoder" in spec:  # not an SDXL refiner's
            te = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).eval()
            te.save_pretrained(out / "text_encoder", max_shard_size=SHARD_SIZE)
            del te
            write_clip_tokenizer(out / "tokenizer", spec["tokenizer_pad"])
        if "text_encoder_2" in spec:
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])).eval()
            te2.save_pretrained(out / "text_encoder_2", max_shard_size=SHARD_SIZE)
            del te2
            write_clip_tokenizer(out / "tokenizer_2", spec["tokenizer_2_pad"])
        unet = UNet2DConditionModel(**spec["unet"]).eval()
        _perturb_zero_init(unet, seed)
        unet.save_pretrained(out / "unet", max_shard_size=SHARD_SIZE)
        del unet
        vae = AutoencoderKL(**spec["vae"]).eval()
        vae.save_pretrained(out / "vae", max_shard_size=SHARD_SIZE)
        del vae
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2) + "\n")
    index = {
        "_class_name": spec["pipeline"],
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    index.update(spec["model_index"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def vae_spec(kind: str) -> tuple[str, dict]:
    """(diffusers class, config) of a test VAE folder of ``kind``."""
    if kind == "kl-vae":  # latents as SMALL_VAE's (4 channels, 8x), another scaling and 64-pixel tiles
        return "AutoencoderKL", dict(SMALL_VAE, block_out_channels=[32, 64, 64, 64], sample_size=64, scaling_factor=0.13025)
    if kind == "taesd":
        return "AutoencoderTiny", dict(encoder_block_out_channels=[16] * 4, decoder_block_out_channels=[16] * 4,
                                       num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1])
    if kind == "taesd-full":
        return "AutoencoderTiny", {}  # diffusers' defaults are TAESD's architecture (madebyollin/taesd)
    raise ValueError(f"unknown test VAE {kind!r}; choose one of {', '.join(VAES)}")


def build_vae(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight diffusers VAE folder of ``kind`` (config.json + weights) to ``out_dir``."""
    import diffusers
    import torch

    cls, config = vae_spec(kind)
    torch.manual_seed(seed)
    with torch.no_grad():
        vae = getattr(diffusers, cls)(**config).eval()
        if cls == "AutoencoderTiny":
            _calibrate_tiny(vae, seed)
        vae.save_pretrained(out_dir)
    return Path(out_dir)


def _calibrate_tiny(vae, seed: int) -> None:
    """Random TAESD weights decode to nearly black (the decoder's last convolution gives about 0, which
    its mul(2).sub(1) makes -1: half the pixels clip) and encode to latents of std 0.07. Rescale each
    half's last convolution (still random weights) so that images spread around grey and latents have
    unit scale: a parity test then compares images, not clipping."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    for half, sample, mean, std in ((vae.encoder, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, 0.0, 1.0),
                                    (vae.decoder, torch.randn(2, 4, 8, 8, generator=g), 0.5, 0.2)):
        conv = half.layers[-1]
        seen = []
        hook = conv.register_forward_hook(lambda mod, args, out: seen.append(out))
        half(sample)
        hook.remove()
        scale = std / float(seen[0].std())
        conv.weight.mul_(scale)
        conv.bias.copy_((conv.bias - float(seen[0].mean())) * scale + mean)


def _perturb_zero_init(module, seed: int) -> None:
    """diffusers zero-initialises some output projections (conv_out of ControlNet-style blocks, proj_out);
    a random test model whose UNet output is exactly zero would hide export bugs, so give them small noise."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    for p in module.parameters():
        if p.dim() > 1 and not p.abs().any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_controlnet(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                     strength: float = 1.0) -> Path:
    """Write a random-weight diffusers ControlNetModel for the checkpoint's UNet to ``out_dir``:
    ``ControlNetModel.from_unet`` (the UNet's weights and config), with the convolutions diffusers zero-initializes
    (``controlnet_down_blocks``, ``controlnet_mid_block``, the conditioning embedding's ``conv_out``) given random
    weights at ``strength`` times a fresh convolution's scale, so that it changes the image (a zero-initialized
    ControlNet adds nothing and proves nothing). Deterministic in ``seed``."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet")
    controlnet = ControlNetModel.from_unet(unet).eval()
    g = torch.Generator().manual_seed(seed + 11)
    zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * strength / fan_in ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1 * strength)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.export.testing", description=__doc__.split("\n")[0])
    ap.add_argument("family", choices=FAMILIES + VAES + (CONTROLNET,))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from", dest="source", metavar="CHECKPOINT",
                    help="controlnet: the diffusers checkpoint whose UNet the ControlNet is made from")
    args = ap.parse_args(argv)
    if (args.family == CONTROLNET) != (args.source is not None):
        ap.error("--from CHECKPOINT is needed by controlnet, and only by it")
    try:
        if args.family == CONTROLNET:
            path = build_controlnet(args.source, args.out_dir, args.seed)
        else:
            build = build_vae if args.family in VAES else build_checkpoint
            path = build(args.family, args.out_dir, args.seed)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "VAE" if args.family in VAES else "ControlNet" if args.family == CONTROLNET else "checkpoint"
    print(f"wrote {args.family} {kind} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
