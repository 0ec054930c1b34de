"""Load a Stable Diffusion checkpoint (diffusers folder or single file) and tell its family."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import SdrtError

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

    family: str  # a key of sdrt.export.families.FAMILIES: sd1 | sd2 | sdxl
    source: Path
    model_index: dict
    scheduler_config: dict
    text_encoder: object
    unet: object
    vae: object
    tokenizer: object
    task: str  # what the UNet was trained for: "text-to-image" | "inpainting" (families.unet_task)
    text_encoder_2: object = None
    tokenizer_2: object = None
    extras: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _family_of(model_index: dict, root: Path):
    """(family descriptor, diffusers loader class name); the text encoder's config tells sd1 from sd2."""
    from .families import detect  # here, not at the top: families builds on this module's Checkpoint

    te_cfg = root / "text_encoder" / "config.json"
    return detect(model_index, _read_json(te_cfg) if te_cfg.is_file() else {}, root)


def _inspect(root: Path):
    """(family, loader class name, model_index) of a diffusers folder, checked without loading weights."""
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; for a single-file checkpoint pass --config DIR (a diffusers config folder)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint: model_index.json is missing")
    model_index = _read_json(index_path)
    family, loader = _family_of(model_index, root)
    for comp in family.checkpoint_folders:
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
    _check_unet_config(root)
    return family, loader, model_index


def _check_unet_config(root: Path) -> None:
    """Refuse a UNet sdrt cannot export from the configs alone, before gigabytes of weights load."""
    from .families import supported, unet_task

    unet_path, vae_path = root / "unet" / "config.json", root / "vae" / "config.json"
    if not unet_path.is_file():
        return
    unet_cfg = _read_json(unet_path)
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{root}/unet is a {unet_cfg['_class_name']}, not a UNet2DConditionModel; sdrt supports {supported()}")
    if vae_path.is_file() and "in_channels" in unet_cfg:
        unet_task(unet_cfg["in_channels"], _read_json(vae_path).get("latent_channels", 4), root)


def inspect_checkpoint(path: str | Path) -> tuple[str, dict]:
    """Check a diffusers folder without loading weights; return (family name, model_index)."""
    family, _, model_index = _inspect(Path(path))
    return family.name, model_index


def _quiet_libraries() -> None:
    """diffusers and transformers print loading bars and advice per component; the exporter
    reports its own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def _load_pipeline(source: Path, config: Path | None):
    import diffusers

    _quiet_libraries()

    if source.is_dir():
        family, loader, model_index = _inspect(source)
        pipe = getattr(diffusers, loader).from_pretrained(source, local_files_only=True, **family.load_kwargs)
        return family, model_index, pipe, source
    if not source.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    if source.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise CheckpointError(f"{source} is neither a diffusers folder nor a .safetensors/.ckpt single-file checkpoint")
    if config is None:
        raise CheckpointError(
            f"{source} is a single-file checkpoint: pass --config DIR naming a local diffusers config folder "
            "of the same architecture (model_index.json and each component's config); no model hub is used"
        )
    family, loader, model_index = _inspect_configs(config)
    # diffusers loads .ckpt with torch.load(weights_only=True): pickled code is never executed.
    pipe = getattr(diffusers, loader).from_single_file(str(source), config=str(config), local_files_only=True)
    return family, model_index, pipe, config


def _inspect_configs(config: Path):
    config = Path(config)
    index_path = config / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"--config {config} is not a diffusers config folder: model_index.json is missing")
    model_index = _read_json(index_path)
    family, loader = _family_of(model_index, config)
    _check_unet_config(config)
    return family, loader, model_index


def inspect_checkpoint_configs(config: Path) -> tuple[str, dict]:
    """Family name and model_index of a config-only diffusers folder (the --config of a single-file checkpoint)."""
    family, _, model_index = _inspect_configs(config)
    return family.name, model_index


def load_checkpoint(path: str | Path, config: str | Path | None = None) -> Checkpoint:
    """Load every component of a checkpoint in fp32, eval mode, on the CPU."""
    from .families import unet_task

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
    modules = family.modules(pipe)
    task = unet_task(modules["unet"].config.in_channels, modules["vae"].config.latent_channels, source)
    return Checkpoint(family.name, source, model_index, scheduler_config, task=task, **modules)
