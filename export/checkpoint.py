"""Load a Stable Diffusion checkpoint (diffusers folder or single file) and tell its family."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import SdrtError

SUPPORTED = "sd1 (Stable Diffusion 1.x), sd2 (2.x) and sdxl (XL base)"
# Pipelines of other architectures, named so the error can say what the checkpoint is.
_UNSUPPORTED_PIPELINES = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
    "StableCascadeCombinedPipeline": "Stable Cascade",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableDiffusionXLRefinerPipeline": "SDXL refiner",
    "StableDiffusionUpscalePipeline": "SD x4 upscaler",
    "IFPipeline": "DeepFloyd IF",
    "SanaPipeline": "Sana",
    "AuraFlowPipeline": "AuraFlow",
}
_SD_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
)


class CheckpointError(SdrtError, ValueError):
    """The input checkpoint cannot be exported; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: torch modules in eval mode plus the facts the exporter needs."""

    family: str  # sd1 | sd2 | sdxl
    source: Path
    model_index: dict
    scheduler_config: dict
    text_encoder: object
    unet: object
    vae: object
    tokenizer: object
    text_encoder_2: object = None
    tokenizer_2: object = None
    extras: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _family_of(model_index: dict, root: Path) -> tuple[str, list[str]]:
    cls = model_index.get("_class_name", "")
    if cls in _UNSUPPORTED_PIPELINES:
        raise CheckpointError(
            f"{root} is a {_UNSUPPORTED_PIPELINES[cls]} checkpoint ({cls}); sdrt supports {SUPPORTED}"
        )
    kind = _SD_PIPELINES.get(cls)
    if kind is None:
        raise CheckpointError(f"{root} holds a {cls or 'unnamed'} pipeline, not one sdrt can export; sdrt supports {SUPPORTED}")
    components = ["text_encoder", "tokenizer", "unet", "vae", "scheduler"]
    if kind == "sdxl":
        if "text_encoder" not in model_index or model_index.get("text_encoder") in (None, [None, None]):
            raise CheckpointError(f"{root} is an SDXL refiner-style checkpoint without text_encoder; sdrt supports {SUPPORTED}")
        components += ["text_encoder_2", "tokenizer_2"]
        return "sdxl", components
    te_cfg = root / "text_encoder" / "config.json"
    te = _read_json(te_cfg) if te_cfg.is_file() else {}
    # SD 2.x uses an OpenCLIP text tower (gelu, 1024 wide) where 1.x uses OpenAI CLIP (quick_gelu, 768).
    family = "sd2" if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024 else "sd1"
    return family, components


def inspect_checkpoint(path: str | Path) -> tuple[str, dict]:
    """Check a diffusers folder without loading weights; return (family, model_index)."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; for a single-file checkpoint pass --config DIR (a diffusers config folder)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint: model_index.json is missing")
    model_index = _read_json(index_path)
    family, components = _family_of(model_index, root)
    for comp in components:
        folder = root / comp
        if comp.startswith("tokenizer"):
            if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise CheckpointError(f"{root} is incomplete: {comp}/tokenizer.json (or vocab.json + merges.txt) is missing")
        elif comp == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                raise CheckpointError(f"{root} is incomplete: scheduler/scheduler_config.json is missing")
        else:
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{root} is incomplete: {comp}/config.json is missing")
            if not any((folder / w).is_file() or any(folder.glob(w.replace(".safetensors", ".*.safetensors"))) for w in _WEIGHT_NAMES):
                raise CheckpointError(f"{root} is incomplete: {comp}/ has no weights file (expected {_WEIGHT_NAMES[0]})")
    unet_cfg = _read_json(root / "unet" / "config.json")
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{root}/unet is a {unet_cfg['_class_name']}, not a UNet2DConditionModel; sdrt supports {SUPPORTED}")
    return family, model_index


def _quiet_libraries() -> None:
    """diffusers and transformers print loading bars and advice per component; the exporter
    reports its own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def _load_pipeline(source: Path, config: Path | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _quiet_libraries()

    if source.is_dir():
        family, model_index = inspect_checkpoint(source)
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        kwargs = dict(safety_checker=None, requires_safety_checker=False) if family != "sdxl" else {}
        return family, model_index, cls.from_pretrained(source, local_files_only=True, **kwargs), source
    if not source.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    if source.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise CheckpointError(f"{source} is neither a diffusers folder nor a .safetensors/.ckpt single-file checkpoint")
    if config is None:
        raise CheckpointError(
            f"{source} is a single-file checkpoint: pass --config DIR naming a local diffusers config folder "
            "of the same architecture (model_index.json and each component's config); no model hub is used"
        )
    family, model_index = inspect_checkpoint_configs(config)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    # diffusers loads .ckpt with torch.load(weights_only=True): pickled code is never executed.
    pipe = cls.from_single_file(str(source), config=str(config), local_files_only=True)
    return family, model_index, pipe, config


def inspect_checkpoint_configs(config: Path) -> tuple[str, dict]:
    """Family of a config-only diffusers folder (the --config of a single-file checkpoint)."""
    config = Path(config)
    index_path = config / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"--config {config} is not a diffusers config folder: model_index.json is missing")
    model_index = _read_json(index_path)
    family, _ = _family_of(model_index, config)
    return family, model_index


def load_checkpoint(path: str | Path, config: str | Path | None = None) -> Checkpoint:
    """Load every component of a checkpoint in fp32, eval mode, on the CPU."""
    source = Path(path)
    try:
        family, model_index, pipe, root = _load_pipeline(source, Path(config) if config else None)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt or truncated weights file, a config diffusers cannot read, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {source}: {type(e).__name__}: {msg} (is a weights file corrupt or truncated?)") from e
    sched_path = Path(root) / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(sched_path) if sched_path.is_file() else dict(pipe.scheduler.config)
    ckpt = Checkpoint(
        family=family,
        source=source,
        model_index=model_index,
        scheduler_config=scheduler_config,
        text_encoder=pipe.text_encoder.float().eval(),
        unet=pipe.unet.float().eval(),
        vae=pipe.vae.float().eval(),
        tokenizer=pipe.tokenizer,
    )
    if family == "sdxl":
        ckpt.text_encoder_2 = pipe.text_encoder_2.float().eval()
        ckpt.tokenizer_2 = pipe.tokenizer_2
        ckpt.extras["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return ckpt
