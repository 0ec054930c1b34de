"""Load a Stable Diffusion checkpoint (diffusers folder or single file) and tell its family."""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    vae_source: Path | None = None  # the --vae folder the VAE came from (None: the checkpoint's own)
    controlnets: list = field(default_factory=list)  # --controlnet folders, loaded (export/controlnet.py)
    # modules whose weights are still on disk (made on the meta device: structure, config and attributes
    # alone), by field name, with what loads them: each is loaded only while a component uses it (loaded())
    on_disk: dict[str, Callable] = field(default_factory=dict)

    @contextlib.contextmanager
    def loaded(self, wrapper):
        """The weights of the checkpoint's modules that ``wrapper`` computes with, loaded from disk for the
        duration and released after: a real-size checkpoint is exported holding one component in memory."""
        inside = {id(m) for m in wrapper.modules()}
        names = [n for n in self.on_disk if id(getattr(self, n)) in inside]
        saved = {}
        try:
            for n in names:
                skeleton = getattr(self, n)
                fresh = self.on_disk[n]()
                saved[n] = dict(skeleton.__dict__)
                skeleton.__dict__.update(fresh.__dict__)  # the skeleton object (which wrappers hold) becomes the module
                del fresh
            yield
        finally:
            for n, state in saved.items():
                skeleton = getattr(self, n)
                skeleton.__dict__.clear()
                skeleton.__dict__.update(state)  # back to the meta-device skeleton: the weights are freed


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


def _inspect(root: Path, vae: tuple[Path, dict] | None = None):
    """(family, loader class name, model_index) of a diffusers folder, checked without loading weights;
    ``vae``: the folder and config of a VAE given instead of the checkpoint's own (inspect_vae)."""
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
        if comp == "vae" and vae is not None:
            continue
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
    _check_unet_config(root, vae)
    return family, loader, model_index


def _check_unet_config(root: Path, vae: tuple[Path, dict] | None = None) -> None:
    """Refuse a UNet sdrt cannot export from the configs alone, before gigabytes of weights load; with
    ``vae`` (given instead of the checkpoint's own), refuse one whose latents the UNet does not take."""
    from .families import supported, unet_task

    unet_path, vae_path = root / "unet" / "config.json", root / "vae" / "config.json"
    if not unet_path.is_file():
        return
    unet_cfg = _read_json(unet_path)
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{root}/unet is a {unet_cfg['_class_name']}, not a UNet2DConditionModel; sdrt supports {supported()}")
    if vae is not None and "in_channels" in unet_cfg:
        _check_vae_fits(vae, unet_cfg["in_channels"], _read_json(vae_path) if vae_path.is_file() else {}, root)
    elif vae_path.is_file() and "in_channels" in unet_cfg:
        unet_task(unet_cfg["in_channels"], _read_json(vae_path).get("latent_channels", 4), root)


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # what diffusers' SD pipelines take as vae=, and sdrt runs


def inspect_vae(path: str | Path) -> tuple[Path, dict]:
    """(folder, config) of a VAE given with ``--vae``, checked without loading weights: a diffusers
    AutoencoderKL or AutoencoderTiny folder (config.json + weights), or a pipeline folder, whose vae/ is taken."""
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"--vae {given} does not exist")
    if not given.is_dir():
        raise CheckpointError(f"--vae {given} is a file; give a diffusers VAE folder (config.json + {_WEIGHT_NAMES[0]})")
    root = given / "vae" if not (given / "config.json").is_file() and (given / "vae" / "config.json").is_file() else given
    if not (root / "config.json").is_file():
        raise CheckpointError(f"--vae {given} is not a diffusers VAE folder: config.json is missing")
    config = _read_json(root / "config.json")
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in VAE_CLASSES:
        raise CheckpointError(f"--vae {given} holds {'a ' + cls if isinstance(cls, str) else 'no diffusers model class'}"
                              f", not a VAE; sdrt takes an {' or an '.join(VAE_CLASSES)} folder")
    if not any((root / w).is_file() for w in _WEIGHT_NAMES):
        raise CheckpointError(f"--vae {given} has no weights file (expected {root / _WEIGHT_NAMES[0]})")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise CheckpointError(f"--vae {given} normalizes its latents with latents_mean/latents_std, which sdrt does not "
                              "support; give a VAE scaled by scaling_factor alone")
    return root, config


def _check_vae_fits(vae: tuple[Path, dict], in_channels: int, own_vae: dict, root: Path) -> None:
    """A --vae VAE must make the latents the UNet takes: as many channels as the checkpoint's own VAE."""
    from .families import unet_task

    z = vae[1].get("latent_channels", 4)
    own = own_vae.get("latent_channels")
    if (own is not None and z != own) or in_channels not in (z, 2 * z + 1):
        want = own if own is not None else in_channels
        raise CheckpointError(f"--vae {vae[0]} makes latents of {z} channels, but the UNet of {root} takes {in_channels} "
                              f"input channels (latents of {want}); give a VAE made for this model's latent space")
    unet_task(in_channels, z, root)


def load_vae(vae: tuple[Path, dict]):
    """The --vae VAE as a torch module (fp32, eval mode)."""
    import diffusers

    _quiet_libraries()
    root, config = vae
    try:
        return getattr(diffusers, config["_class_name"]).from_pretrained(root, local_files_only=True).float().eval()
    except Exception as e:  # a corrupt or truncated weights file, a config diffusers cannot read
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load --vae {root}: {type(e).__name__}: {msg}") from e


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


class _OnDisk:
    """A diffusers folder's pipeline as the family reads it (``family.modules``), its models' weights left on
    disk: each model is made on the meta device from its config and loaded when a component is exported
    (Checkpoint.loaded), with the class and ``from_pretrained`` diffusers' own pipeline loading would use."""

    def __init__(self, root: Path, model_index: dict, folders, vae_module=None):
        import torch

        self.config, self.loaders = model_index, {}
        for name in folders:
            entry = model_index.get(name)
            if name == "scheduler" or not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
                continue
            cls = getattr(importlib.import_module(entry[0]), entry[1])
            folder = root / name
            if name.startswith("tokenizer"):
                value = cls.from_pretrained(folder, local_files_only=True)
            elif name == "vae" and vae_module is not None:
                value = vae_module  # --vae: diffusers' vae= argument
            else:
                with torch.device("meta"):
                    value = (cls.from_config(cls.load_config(folder)) if hasattr(cls, "load_config")  # diffusers
                             else cls._from_config(cls.config_class.from_pretrained(folder)))  # transformers
                self.loaders[name] = lambda cls=cls, folder=folder: _load_module(cls, folder)
            setattr(self, name, value)


def _load_module(cls, folder: Path):
    try:
        return cls.from_pretrained(folder, local_files_only=True).float().eval()
    except Exception as e:  # a corrupt or truncated weights file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {folder}: {type(e).__name__}: {msg} (is a weights file corrupt or truncated?)") from e


def _load_pipeline(source: Path, config: Path | None, vae: tuple[Path, dict] | None = None):
    import diffusers

    _quiet_libraries()

    if source.is_dir():
        family, loader, model_index = _inspect(source, vae)
        pipe = _OnDisk(source, model_index, family.checkpoint_folders, load_vae(vae) if vae else None)
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
    family, loader, model_index = _inspect_configs(config, vae)
    # diffusers loads .ckpt with torch.load(weights_only=True): pickled code is never executed.
    pipe = getattr(diffusers, loader).from_single_file(str(source), config=str(config), local_files_only=True,
                                                       **({"vae": load_vae(vae)} if vae else {}))
    return family, model_index, pipe, config


def _inspect_configs(config: Path, vae: tuple[Path, dict] | None = None):
    config = Path(config)
    index_path = config / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"--config {config} is not a diffusers config folder: model_index.json is missing")
    model_index = _read_json(index_path)
    family, loader = _family_of(model_index, config)
    _check_unet_config(config, vae)
    return family, loader, model_index


def inspect_checkpoint_configs(config: Path) -> tuple[str, dict]:
    """Family name and model_index of a config-only diffusers folder (the --config of a single-file checkpoint)."""
    family, _, model_index = _inspect_configs(config)
    return family.name, model_index


def load_checkpoint(path: str | Path, config: str | Path | None = None, vae: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint: every component in fp32, eval mode, on the CPU; a diffusers folder's models with their
    weights still on disk, loaded one at a time by ``Checkpoint.loaded`` (a single-file checkpoint is loaded
    whole, by diffusers' ``from_single_file``). ``vae``: a diffusers VAE folder to take instead of the
    checkpoint's own (inspect_vae), as diffusers' ``from_pretrained(..., vae=)``."""
    from .families import unet_task

    source = Path(path)
    vae_folder = inspect_vae(vae) if vae is not None else None
    try:
        family, model_index, pipe, root = _load_pipeline(source, Path(config) if config else None, vae_folder)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt or truncated weights file, a config diffusers cannot read, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {source}: {type(e).__name__}: {msg} (is a weights file corrupt or truncated?)") from e
    sched_path = Path(root) / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(sched_path) if sched_path.is_file() else dict(pipe.scheduler.config)
    modules = family.modules(pipe)
    task = unet_task(modules["unet"].config.in_channels, modules["vae"].config.latent_channels, source)
    return Checkpoint(family.name, source, model_index, scheduler_config, task=task,
                      vae_source=vae_folder[0].absolute() if vae_folder else None,
                      on_disk=pipe.loaders if isinstance(pipe, _OnDisk) else {}, **modules)
