"""ControlNets exported beside a model (``sdrt export CHECKPOINT --controlnet DIR``): each diffusers
``ControlNetModel`` folder checked against the checkpoint's UNet from the configs alone (before anything is
loaded or written), and the descriptors of what it adds to the export: one ``controlnet.<name>`` graph per
ControlNet (``controlnet/<name>/model.onnx``: latents, timestep, text conditioning and the control image in,
the down-block and mid-block residuals out, at conditioning scale 1: the runtime scales them) and one
``unet_controlnet`` graph, the UNet taking those residuals as inputs (diffusers' UNet2DConditionModel.forward
with ``down_block_additional_residuals`` and ``mid_block_additional_residual``). The plain ``unet`` graph is
left as it is. The runtime side is sdrt.runtime.controlnet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.controlnet import CONTROLNET_FOLDER, CONTROLNET_UNET, component_name, dim_size

from .checkpoint import _WEIGHT_NAMES, CheckpointError

CLASS_NAME = "ControlNetModel"
# what must agree between a ControlNet and the UNet it steers: residual shapes (block_out_channels,
# layers_per_block), the text conditioning it attends to, SDXL's added text_time conditioning
MATCHING_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
                 "addition_time_embed_dim", "projection_class_embeddings_input_dim")
CONDITIONING_INPUT = "controlnet_cond"


@dataclass
class ControlNetSource:
    """A --controlnet folder, checked: its name in the model directory, path and config."""

    name: str
    root: Path
    config: dict
    module: object = None  # the ControlNetModel, once loaded (fp32, eval mode)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _name(root: Path) -> str:
    """The folder's name, as a safe folder and component name (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.absolute().name).strip(".-") or "controlnet"
    return name


def inspect_controlnets(paths, checkpoint, config=None) -> list[ControlNetSource]:
    """The --controlnet folders, each checked without loading weights: a diffusers ControlNetModel folder
    (config.json + weights) whose residuals and conditioning fit the checkpoint's UNet (its config.json, in the
    checkpoint folder or the --config folder of a single-file checkpoint), with a name no other has. One-line
    CheckpointError otherwise; nothing has been written then."""
    from . import families
    from .checkpoint import inspect_checkpoint, inspect_checkpoint_configs

    if not paths:
        return []
    base = Path(config) if config is not None else Path(checkpoint)
    family_name, _ = inspect_checkpoint_configs(base) if config is not None else inspect_checkpoint(base)
    family = families.get(family_name)
    if not family.takes_controlnet:
        raise CheckpointError(f"--controlnet: {base} is a {family.title} checkpoint, which diffusers runs no "
                              "ControlNet with; give a base model (SD 1.x, 2.x or SDXL)")
    unet = _read_json(base / "unet" / "config.json")
    vae = _read_json(base / "vae" / "config.json") if (base / "vae" / "config.json").is_file() else {}
    latent_channels = vae.get("latent_channels", 4)
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    out, seen = [], {}
    for p in paths:
        given = Path(p)
        if not given.is_dir():
            raise CheckpointError(f"--controlnet {given} {'is a file' if given.exists() else 'does not exist'}; "
                                  f"give a diffusers {CLASS_NAME} folder (config.json + {_WEIGHT_NAMES[0]})")
        if not (given / "config.json").is_file():
            raise CheckpointError(f"--controlnet {given} is not a diffusers {CLASS_NAME} folder: config.json is missing")
        cfg = _read_json(given / "config.json")
        cls = cfg.get("_class_name")
        if cls != CLASS_NAME:
            raise CheckpointError(f"--controlnet {given} holds {'a ' + cls if isinstance(cls, str) else 'no diffusers model class'}"
                                  f", not a {CLASS_NAME}; give a diffusers ControlNet folder")
        if not any((given / w).is_file() for w in _WEIGHT_NAMES):
            raise CheckpointError(f"--controlnet {given} has no weights file (expected {given / _WEIGHT_NAMES[0]})")
        for key in MATCHING_KEYS:
            mine, theirs = _norm(cfg.get(key)), _norm(unet.get(key))
            if mine != theirs:
                what = " (the text conditioning's width)" if key == "cross_attention_dim" else ""
                raise CheckpointError(f"--controlnet {given} has {key} {mine}{what}, the UNet of {base} has {theirs}: "
                                      "it was made for another model; give a ControlNet for this base model")
        if cfg.get("in_channels", 4) != latent_channels:
            raise CheckpointError(f"--controlnet {given} takes {cfg.get('in_channels')}-channel latents, the model's "
                                  f"VAE makes {latent_channels}; give a ControlNet for this base model")
        cond = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        if 2 ** (len(cond) - 1) != vae_scale:
            raise CheckpointError(f"--controlnet {given} downsamples its control image by {2 ** (len(cond) - 1)}, the "
                                  f"VAE by {vae_scale}; give a ControlNet for this base model")
        if cfg.get("global_pool_conditions"):
            raise CheckpointError(f"--controlnet {given} has global_pool_conditions (a shuffle-style ControlNet, run in "
                                  "guess mode), which sdrt does not support")
        name = _name(given)
        if name in seen:
            raise CheckpointError(f"--controlnet {given} and {seen[name]} would both be named {name!r} in the model "
                                  "directory (the folder's name); rename one of the folders")
        seen[name] = given
        out.append(ControlNetSource(name, given.absolute(), cfg))
    return out


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def load_controlnets(sources: list[ControlNetSource]) -> list[ControlNetSource]:
    """Each source with its ControlNetModel loaded (fp32, eval mode); CheckpointError in one line for weights
    diffusers cannot read."""
    import diffusers

    for s in sources:
        try:
            s.module = diffusers.ControlNetModel.from_pretrained(s.root, local_files_only=True).float().eval()
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load --controlnet {s.root}: {type(e).__name__}: {msg}") from e
    return sources


# -- the graphs -----------------------------------------------------------------------------------


def residual_specs(controlnet) -> list:
    """The residuals a ControlNet gives, in diffusers' order: one per down-block output (conv_in's, each
    resnet's, each downsampler's), then the mid block's. Spatial sizes are the latents' divided by 2 per
    downsampling so far (``latent_height/2``, ...; stride-2 convolutions: rounded up)."""
    from .components import BATCH, LAT_H, LAT_W, TensorSpec

    cfg = controlnet.config
    factors, f = [1], 1
    for i in range(len(cfg.block_out_channels)):
        factors += [f] * cfg.layers_per_block
        if i < len(cfg.block_out_channels) - 1:
            f *= 2
            factors.append(f)
    blocks = list(controlnet.controlnet_down_blocks)
    if len(blocks) != len(factors):
        raise CheckpointError(f"the ControlNet has {len(blocks)} down-block residuals, sdrt expected {len(factors)} "
                              "from its config")

    def dims(k):
        return [LAT_H, LAT_W] if k == 1 else [f"{LAT_H}/{k}", f"{LAT_W}/{k}"]

    down = [TensorSpec(f"down_block_additional_residual_{i}", "float32", [BATCH, b.out_channels, *dims(k)])
            for i, (b, k) in enumerate(zip(blocks, factors))]
    mid = TensorSpec("mid_block_additional_residual", "float32",
                     [BATCH, controlnet.controlnet_mid_block.out_channels, *dims(f)])
    return down + [mid]


def _shape_at(spec, b: int, h: int, w: int) -> tuple:
    sizes = {"batch": b, "latent_height": h, "latent_width": w}
    return tuple(dim_size(d, sizes) for d in spec.shape)


def controlnet_module(controlnet, added: list[str]):
    import torch

    class Residuals(torch.nn.Module):
        """ControlNetModel at conditioning scale 1 (the runtime scales and sums the residuals), guess mode off:
        (sample, timestep, encoder_hidden_states, *added, controlnet_cond) -> (*down residuals, mid residual)."""

        def __init__(self):
            super().__init__()
            self.controlnet, self.added = controlnet, tuple(added)

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            *added_values, cond = rest
            kw = dict(added_cond_kwargs=dict(zip(self.added, added_values))) if self.added else {}
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=cond,
                                        conditioning_scale=1.0, return_dict=False, **kw)
            return (*down, mid)

    return Residuals()


def unet_with_residuals(unet, added: list[str], n_down: int):
    import torch

    class UNetWithResiduals(torch.nn.Module):
        """UNet2DConditionModel taking ControlNet residuals after its usual inputs: n_down down-block ones and
        the mid block's (diffusers' down_block_additional_residuals, mid_block_additional_residual)."""

        def __init__(self):
            super().__init__()
            self.unet, self.added, self.n_down = unet, tuple(added), n_down

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            k = len(self.added)
            cond = dict(zip(self.added, rest[:k])) if self.added else None
            residuals = rest[k:]
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond,
                             down_block_additional_residuals=tuple(residuals[: self.n_down]),
                             mid_block_additional_residual=residuals[self.n_down], return_dict=False)[0]

    return UNetWithResiduals()


def controlnet_components(family, ckpt, L: int, ctx_dim: int) -> list:
    """The ``unet_controlnet`` graph and one graph per ControlNet, or none without --controlnet. Validated at
    the UNet's shapes."""
    import torch

    from .components import BATCH, IMG_H, IMG_W, LAT_H, LAT_W, TEXT_LEN, Component, TensorSpec

    sources = getattr(ckpt, "controlnets", None) or []
    if not sources:
        return []
    unet_comp = family.unet_component(ckpt, L, ctx_dim)
    added = family.unet_added_inputs(ckpt.unet)
    f = 2 ** (len(ckpt.vae.config.block_out_channels) - 1)
    residuals = residual_specs(sources[0].module)  # the same for every ControlNet: checked against the UNet's config
    n_down = len(residuals) - 1

    def residual_sample(b, h, w):
        return tuple(torch.randn(_shape_at(r, b, h, w)) for r in residuals)

    unet_cfg = json.loads(ckpt.unet.to_json_string())
    unet_cfg.pop("_name_or_path", None)
    comps = [Component(
        CONTROLNET_UNET,
        unet_with_residuals(ckpt.unet, [t.name for t in added], n_down),
        unet_comp.inputs + residuals,
        unet_comp.outputs,
        lambda b, h, w: unet_comp.sample(b, h, w) + residual_sample(b, h, w),
        unet_comp.validation_shapes,
        config=unet_cfg,
        trace_at=unet_comp.trace_at,
    )]
    for src in sources:
        cn = src.module
        c_in, cond_ch = cn.config.in_channels, cn.config.conditioning_channels

        def sample(b, h, w, c_in=c_in, cond_ch=cond_ch):
            chunks = 1 if b > 1 else 2  # as the UNet's: the single-image shape runs a two-chunk text
            return (
                torch.randn(b, c_in, h, w),
                torch.full((b,), 500.0) + torch.arange(b, dtype=torch.float32) * 37,
                torch.randn(b, L * chunks, ctx_dim),
            ) + family.unet_added_sample(ckpt.unet, b, h, w) + (torch.rand(b, cond_ch, h * f, w * f),)

        config = json.loads(cn.to_json_string())
        config.pop("_name_or_path", None)
        comps.append(Component(
            component_name(src.name),
            controlnet_module(cn, [t.name for t in added]),
            [
                TensorSpec("sample", "float32", [BATCH, c_in, LAT_H, LAT_W]),
                TensorSpec("timestep", "float32", [BATCH]),
                TensorSpec("encoder_hidden_states", "float32", [BATCH, TEXT_LEN, ctx_dim]),
                *added,
                TensorSpec(CONDITIONING_INPUT, "float32", [BATCH, cond_ch, IMG_H, IMG_W]),
            ],
            residual_specs(cn),
            sample,
            unet_comp.validation_shapes,
            folder=f"{CONTROLNET_FOLDER}/{src.name}",
            config=config,
            trace_at=unet_comp.trace_at,
        ))
    return comps


def controlnet_facts(ckpt) -> dict:
    """The manifest's ``controlnets`` (name, component, files, source, conditioning channels and input, the
    residuals' names and shapes) and ``controlnet_unet`` (the UNet graph that takes them); nothing without
    --controlnet."""
    sources = getattr(ckpt, "controlnets", None) or []
    if not sources:
        return {}
    recs = []
    for s in sources:
        folder = f"{CONTROLNET_FOLDER}/{s.name}"
        recs.append({
            "name": s.name,
            "component": component_name(s.name),
            "file": f"{folder}/model.onnx",
            "config": f"{folder}/config.json",
            "source": str(s.root),
            "class": CLASS_NAME,
            "conditioning_channels": int(s.module.config.conditioning_channels),
            "conditioning_input": CONDITIONING_INPUT,
            "channel_order": s.module.config.controlnet_conditioning_channel_order,
            "residuals": [r.as_dict() for r in residual_specs(s.module)],
        })
    return {"controlnet_unet": CONTROLNET_UNET, "controlnets": recs}
