"""``sdrt export``: a diffusers checkpoint becomes an sdrt model directory, atomically.

Everything is assembled in a temporary folder beside the target and renamed into place at the
end: an interrupted export leaves no target, and an existing target stays intact until the new
one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from sdrt import __version__
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.files import default_mode, release_memory, replace_dir, sha256_file, write_json_atomic
from sdrt.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, check_generation_defaults

from . import families, onnx_graph, weights
from .tokenizer_files import CLASSIC_FILES, write_classic_files
from .checkpoint import Checkpoint, CheckpointError, inspect_vae, load_checkpoint
from .controlnet import inspect_controlnets, load_controlnets
from .validate import FP16_MAX_REL, FP32_MAX_REL, ValidationError, compare, reference


class ExportError(SdrtError, RuntimeError):
    """The export could not complete; the previous model directory (if any) is untouched."""


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it (it is kept until the new export is complete)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {parent}: {e.strerror}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"the output folder {parent} is not writable; choose another --out")


def _write_tokenizer(tok, dest: Path, source: Path | None = None) -> dict:
    """tokenizer.json for the `tokenizers` library, encoding exactly as the checkpoint's tokenizer, and the
    files a Hub checkpoint has beside it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json: what transformers 4's CLIPTokenizer, and so optimum, reads): the checkpoint's
    own when its folder ``source`` has vocab.json and merges.txt, else written from tokenizer.json."""
    if not getattr(tok, "is_fast", False):
        from transformers import CLIPTokenizerFast

        tok = CLIPTokenizerFast.from_pretrained(tok.name_or_path)
    dest.mkdir(parents=True, exist_ok=True)
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dest / "tokenizer.json"))
    write_classic_files(dest / "tokenizer.json", dest, bos_token=tok.bos_token, eos_token=tok.eos_token,
                        unk_token=tok.unk_token or tok.eos_token, pad_token=tok.pad_token,
                        model_max_length=min(tok.model_max_length, 77))
    if source is not None and all((source / f).is_file() for f in ("vocab.json", "merges.txt")):
        for name in CLASSIC_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dest / name)  # verbatim
    return {
        "file": f"{dest.name}/tokenizer.json",
        "max_length": int(min(tok.model_max_length, 77)),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


CONFIG_NAME = "config.json"


def component_config(ckpt: Checkpoint, name: str) -> dict:
    """A component's config.json, as optimum writes it beside each graph: the source module's config (the
    AutoencoderKL's for both VAE halves), without the path it was loaded from."""
    module = {"text_encoder": ckpt.text_encoder, "text_encoder_2": ckpt.text_encoder_2, "unet": ckpt.unet}.get(name, ckpt.vae)
    if hasattr(module, "to_json_string"):  # diffusers' ConfigMixin
        config = json.loads(module.to_json_string())
    else:  # transformers: every key, num_hidden_layers included (optimum's SDXL text encoders read it)
        config = module.config.to_dict()
    config.pop("_name_or_path", None)
    return config


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    fp16: bool = False,
    fp16_vae: bool = False,
    overwrite: bool = False,
    opset: int = onnx_graph.OPSET,
    generation_defaults: dict | None = None,
    vae: str | os.PathLike | None = None,
    controlnets: list | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export ``checkpoint`` to the model directory ``out``; returns the manifest written.
    ``generation_defaults`` ({"guidance_scale": ..., "num_inference_steps": ...}) are recorded in the
    manifest: the runtime uses them when a call does not give those settings. ``vae``: a diffusers
    AutoencoderKL or AutoencoderTiny folder exported instead of the checkpoint's own VAE (diffusers' vae=).
    ``controlnets``: diffusers ControlNetModel folders exported beside the model (export/controlnet.py)."""
    out = Path(out).absolute()
    try:
        generation_defaults = check_generation_defaults(generation_defaults or {})
    except ValueError as e:
        raise ExportError(str(e)) from e
    if vae is not None:
        inspect_vae(vae)  # a folder that is not a VAE is refused before anything is written
    controlnet_sources = inspect_controlnets(controlnets, checkpoint, config)  # so is a ControlNet that does not fit
    _check_target(out, overwrite)
    t0 = time.perf_counter()
    log(f"loading {checkpoint}")
    ckpt = load_checkpoint(checkpoint, config, vae=vae)
    ckpt.controlnets = load_controlnets(controlnet_sources)
    log(f"  family {ckpt.family}, task {ckpt.task}, loaded in {time.perf_counter() - t0:.1f}s"
        + (f"; VAE: {type(ckpt.vae).__name__} from {ckpt.vae_source}" if ckpt.vae_source else ""))

    _remove_stale_work_dirs(out)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write in the output folder {out.parent}: {e.strerror}; choose another --out") from e
    os.chmod(work, default_mode(directory=True))  # mkdtemp makes it private; the result should not be
    try:
        manifest = _export_into(ckpt, work, fp16=fp16, fp16_vae=fp16_vae, opset=opset,
                                generation_defaults=generation_defaults, log=log)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"exported {ckpt.family} to {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _remove_stale_work_dirs(out: Path) -> None:
    """Temporary folders left by exports that were killed (their process is gone)."""
    for d in out.parent.glob(f".{out.name}.export-*"):
        try:
            pid = int(d.name.rsplit("export-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _export_into(ckpt: Checkpoint, work: Path, *, fp16: bool, fp16_vae: bool, opset: int, generation_defaults: dict,
                 log) -> dict:
    src = ckpt.source if ckpt.source.is_dir() else None
    # one per text encoder, in their order (an SDXL refiner has the second alone)
    tokenizers = [_write_tokenizer(tok, work / name, src and src / name)
                  for name, tok in (("tokenizer", ckpt.tokenizer), ("tokenizer_2", ckpt.tokenizer_2)) if tok is not None]
    (work / "scheduler").mkdir()
    sched_src = src / "scheduler" / "scheduler_config.json" if src else None
    if sched_src and sched_src.is_file():
        shutil.copyfile(sched_src, work / "scheduler" / "scheduler_config.json")  # verbatim
    else:
        (work / "scheduler" / "scheduler_config.json").write_text(json.dumps(ckpt.scheduler_config, indent=2) + "\n")
    (work / "model_index.json").write_text(json.dumps(ckpt.model_index, indent=2) + "\n")

    family = families.get(ckpt.family)
    comps = family.components(ckpt, max_length=tokenizers[0]["max_length"])
    records = {}
    for n, comp in enumerate(comps, 1):
        half = fp16 and (not comp.name.startswith("vae") or fp16_vae)
        t = time.perf_counter()
        log(f"[{n}/{len(comps)}] {comp.name}: exporting{' (fp16)' if half else ''}")
        folder = comp.folder or comp.name
        dest = work / folder
        dest.mkdir(parents=True)
        lora = comp.name in weights.LORA_COMPONENTS
        with contextlib.ExitStack() as held:
            # the module's weights are in memory from here until the graph is mapped (LoRA), not during its
            # save or its validation: the reference outputs are computed first
            held.enter_context(ckpt.loaded(comp.module))
            refs = reference(comp)
            external = onnx_graph.export_graph(comp, dest / "model.onnx", opset, fp16=half, lora=lora,
                                               release=held.close)
        release_memory()
        t_export = time.perf_counter() - t
        try:
            val = compare(comp, dest / "model.onnx", refs)
            del refs
        except ValidationError as e:
            raise ExportError(str(e)) from e
        except Exception as e:
            if not (half and type(e).__name__ == "NotImplemented"):
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(f"{comp.name}: ONNX Runtime cannot load or run the exported graph: {first}") from e
            val = {"skipped": f"ONNX Runtime CPU has no fp16 kernel for an op of this graph: {e}".splitlines()[0]}
        limit = FP16_MAX_REL if half else FP32_MAX_REL
        if "max_rel_error" in val and val["max_rel_error"] > limit:
            raise ExportError(
                f"{comp.name}: ONNX output differs from PyTorch by {val['max_rel_error']:.2e} relative "
                f"(limit {limit:.0e} for {'fp16' if half else 'fp32'}); the export is not faithful"
            )
        size = sum(f.stat().st_size for f in dest.iterdir())
        write_json_atomic(dest / CONFIG_NAME, comp.config if comp.config is not None else component_config(ckpt, comp.name))
        records[comp.name] = {
            "file": f"{folder}/model.onnx",
            "config": f"{folder}/{CONFIG_NAME}",
            "external_data": f"{folder}/{onnx_graph.EXTERNAL_DATA_NAME}" if external else None,
            "inputs": [s.as_dict() for s in comp.inputs],
            "outputs": [s.as_dict() for s in comp.outputs],
            "precision": "fp16" if half else "fp32",
            "opset": opset,
            "size_bytes": size,
            "sha256": sha256_file(dest / "model.onnx"),
            "external_data_sha256": sha256_file(dest / onnx_graph.EXTERNAL_DATA_NAME) if external else None,
            **({"weights": f"{folder}/{weights.WEIGHTS_NAME}"} if lora else {}),
            "validation": val,
        }
        err = f"max abs {val['max_abs_error']:.2e}, rel {val['max_rel_error']:.2e}" if "max_abs_error" in val else val["skipped"]
        log(
            f"[{n}/{len(comps)}] {comp.name}: {size / 2**20:.1f} MiB, export {t_export:.1f}s, "
            f"validate {time.perf_counter() - t - t_export:.1f}s ({err}), peak RSS so far {_peak_rss_gib():.1f} GiB"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "sdrt_version": __version__,
        **family.manifest_facts(ckpt),
        "tokenizers": tokenizers,
        "components": records,
        "engines": {},
        **({"generation_defaults": generation_defaults} if generation_defaults else {}),
        "source": {"checkpoint": str(ckpt.source), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    write_json_atomic(work / MANIFEST_NAME, manifest)
    return manifest


__all__ = ["export_model", "ExportError", "CheckpointError"]
