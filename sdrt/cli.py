"""The ``sdrt`` command: export, build, generate, bench, serve, info."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, no traceback."""


def _cmd_export(args) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time advice about torchvision
    from sdrt.export.checkpoint import CheckpointError
    from sdrt.export.exporter import ExportError, export_model

    from sdrt.runtime.manifest import check_generation_defaults

    flags = {"guidance_scale": "--default-guidance", "num_inference_steps": "--default-steps"}
    defaults = {k: v for k, v in (("guidance_scale", args.default_guidance),
                                  ("num_inference_steps", args.default_steps)) if v is not None}
    try:
        check_generation_defaults(defaults)  # the manifest's own rules, reported with the flags' names
    except ValueError as e:
        msg = str(e)
        for key, flag in flags.items():
            msg = msg.replace(f"the default {key}", flag)
        raise UserError(msg) from e
    try:
        manifest = export_model(
            args.checkpoint,
            args.out,
            config=args.config,
            fp16=args.fp16,
            fp16_vae=args.fp16_vae,
            overwrite=args.overwrite,
            opset=args.opset,
            generation_defaults=defaults,
            vae=args.vae,
            controlnets=args.controlnet,
        )
    except (CheckpointError, ExportError) as e:
        raise UserError(str(e)) from e
    print()
    print(f"{'component':<16}{'precision':>10}{'size MiB':>11}{'max abs err':>14}{'max rel err':>14}")
    for name, rec in manifest["components"].items():
        val = rec["validation"]
        errs = (
            f"{val['max_abs_error']:>14.2e}{val['max_rel_error']:>14.2e}" if "max_abs_error" in val else "   (not validated)"
        )
        print(f"{name:<16}{rec['precision']:>10}{rec['size_bytes'] / 2**20:>11.1f}{errs}")
    return 0


def _cmd_import(args) -> int:
    from sdrt.runtime.errors import ModelDirError
    from sdrt.runtime.optimum import import_model

    print(f"importing {args.source}")
    try:
        manifest = import_model(args.source, args.out, overwrite=args.overwrite)
    except ModelDirError as e:
        raise UserError(str(e)) from e
    print(f"wrote {manifest['family']} model directory {args.out} ({len(manifest['components'])} components)")
    return 0


def _cmd_info(args) -> int:
    from sdrt.runtime.info import describe, verify
    from sdrt.runtime.manifest import ModelDirError

    try:
        if not args.verify:
            print(describe(args.model_dir))
            return 0
        checked, bad = verify(args.model_dir)
    except ModelDirError as e:
        raise UserError(str(e)) from e
    for line in bad:
        print(f"mismatch: {line}")
    if bad:
        raise UserError(f"{len(bad)} of {len(checked)} files in {args.model_dir} do not match the sha256 sdrt.json records: "
                        "re-export the model with `sdrt export --overwrite` (and rebuild engines with `sdrt build --force`)")
    print(f"{args.model_dir}: all {len(checked)} files match the sha256 sdrt.json records")
    return 0


def _lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (FILE, SCALE); the scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass  # a colon in the path itself
    if not Path(spec).exists():
        raise UserError(f"--lora {spec}: no such file (give FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
    return spec, 1.0


def _cmd_generate(args) -> int:
    import warnings

    import numpy as np

    from sdrt.runtime.errors import GenerationError, SdrtError
    from sdrt.runtime.images import output_paths, save_png
    from sdrt.runtime.pipeline import Pipeline

    png = _from_png(args) if args.from_png else {}
    if args.prompt is None:
        raise UserError("give a PROMPT, or --from-png FILE to take it and the other settings from an image")
    model = args.model or _default_model()
    out_dir = Path(args.out).absolute().parent
    if not out_dir.is_dir():
        raise UserError(f"the output folder {out_dir} does not exist; create it or choose another --out")
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist")
    loras = [_lora_spec(spec) for spec in args.lora or ()]
    control = _control_arguments(args)
    if args.refiner:
        args.refiner_start = 0.8 if args.refiner_start is None else args.refiner_start
        _check_refiner(model, args)
    try:
        pipe = Pipeline.load(model, backend=args.backend, cuda_graph=args.cuda_graph, precision=args.precision)
        if loras:
            pipe.use_loras(loras)
        if args.vae_tiling:
            pipe.enable_vae_tiling()
    except (SdrtError, ValueError) as e:  # a model directory, backend, engine or LoRA that cannot load
        raise UserError(str(e)) from e
    if png.get("scheduler") is not None and args.scheduler == png["scheduler"]:
        from sdrt.runtime.schedulers import scheduler_name_for_config

        if scheduler_name_for_config(pipe.scheduler_config) == args.scheduler:
            args.scheduler = None  # the model's own scheduler, as when the image was drawn
    from tqdm import tqdm

    bars = []

    def progress(step, total):
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", disable=args.quiet, leave=False))
        bars[0].update(1)

    # Record the seed actually used, so the PNG's parameters reproduce the image.
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")

    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.num_images or 1, scheduler=args.scheduler,
                  scheduler_config=png.get("scheduler_config"), callback=progress,
                  prompt_syntax=None if args.prompt_syntax in (None, "none") else args.prompt_syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            generator = np.random.default_rng(seed)  # one noise source for the base and the refiner, as in diffusers
            hand_off = dict(denoising_end=args.refiner_start, output_type="latent") if args.refiner else {}
            result = pipe(args.prompt, height=args.height, width=args.width, generator=generator, image=args.init_image,
                          mask_image=args.mask, strength=args.strength, **common, **hand_off, **control)
            if args.refiner:
                result = _refine(pipe, args, result, generator, common, bars)
        except GenerationError as e:
            raise UserError(_as_flags(str(e))) from e
        except SdrtError as e:  # NaN, shapes outside an engine's profile, a component that cannot open
            raise UserError(str(e)) from e
        finally:
            for bar in bars:
                bar.close()
    params = dict(result.parameters, seed=seed)
    if args.refiner:
        params.update(refiner=str(Path(args.refiner).absolute()), refiner_start=args.refiner_start)
    params.update({k: v for k, v in (("init_image", args.init_image), ("mask", args.mask),
                                     ("control_images", args.control_image),
                                     ("loras", [[p, w] for p, w in loras])) if v})
    from sdrt import __version__

    # what --from-png needs to find the model again, and the batch the image was one of
    params.update(model_path=str(Path(model).absolute()), num_images=args.num_images or 1, version=f"sdrt {__version__}")
    for i, (image, path) in enumerate(zip(result.images, output_paths(args.out, len(result.images)))):
        save_png(image, path, {**params, "image_index": i})
        print(f"wrote {path}")
    print(f"{pipe.backend}: {result.timings.summary()}")
    return 0


def _control_spec(spec: str) -> tuple[str, str | None]:
    """``PATH[:NAME]`` -> (PATH, NAME or None); a path that exists as given is taken whole (it may hold a colon)."""
    path, sep, name = spec.rpartition(":")
    if Path(spec).exists() or not sep or not path:
        path, name = spec, None
    if not Path(path).is_file():
        raise UserError(f"--control-image {path} does not exist (give PATH or PATH:NAME, NAME a ControlNet of the model)")
    return path, name


def _control_arguments(args) -> dict:
    """--control-image PATH[:NAME] (repeatable) and --control-scale S (one for all, or one per image, in order) as
    the pipeline's control_image, controlnet and controlnet_conditioning_scale."""
    specs = [_control_spec(s) for s in args.control_image or ()]
    scales = args.control_scale or []
    if not specs:
        if scales:
            raise UserError("--control-scale needs --control-image")
        return {}
    names = [n for _, n in specs]
    if any(names) and not all(names):
        raise UserError("give every --control-image a ControlNet name (PATH:NAME), or none (one image per ControlNet "
                        "of the model, in its order)")
    if len(scales) not in (0, 1, len(specs)):
        raise UserError(f"{len(scales)} --control-scale values for {len(specs)} --control-image; give one, or one per image")
    paths = [p for p, _ in specs]
    out = {"control_image": paths[0] if len(paths) == 1 else paths}
    if all(names):
        out["controlnet"] = names
    if scales:
        out["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    return out


def _check_refiner(model, args) -> None:
    """--refiner: a refiner for this base, and a start in (0, 1), before anything is loaded."""
    from sdrt.runtime.errors import GenerationError, SdrtError
    from sdrt.runtime.families import check_hand_off
    from sdrt.runtime.manifest import load_manifest

    if not 0.0 < args.refiner_start < 1.0:
        raise UserError(f"--refiner-start must be in (0, 1), the fraction of the steps the base runs; got {args.refiner_start}")
    if args.mask:
        raise UserError("--refiner is for text to image and image to image, not inpainting (--mask)")
    try:
        check_hand_off(load_manifest(model), load_manifest(args.refiner), where=f"--refiner {args.refiner}")
    except (GenerationError, SdrtError) as e:
        raise UserError(str(e)) from e


def _refine(base, args, result, generator, common: dict, bars):
    """The base's latents (stopped at --refiner-start) through the refiner from there; the base is released first."""
    from sdrt.runtime.pipeline import Pipeline

    base.close()
    refiner = Pipeline.load(args.refiner, backend=args.backend, cuda_graph=args.cuda_graph)
    bars.clear()  # the refiner's own progress bar
    try:
        return refiner(args.prompt, image=result.images, denoising_start=args.refiner_start, generator=generator, **common)
    finally:
        refiner.close()


# `sdrt generate` flags -> the keys of the record a PNG carries (images.read_parameters) that --from-png reads
_PNG_FLAGS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "num_inference_steps",
              "guidance": "guidance_scale", "seed": "seed", "height": "height", "width": "width",
              "scheduler": "scheduler", "strength": "strength", "prompt_syntax": "prompt_syntax",
              "init_image": "init_image", "mask": "mask", "num_images": "num_images", "refiner": "refiner",
              "refiner_start": "refiner_start"}


def _from_png(args) -> dict:
    """Fill the flags not given on the command line from the generation parameters of ``--from-png``: sdrt's
    own record when the PNG has one, else AUTOMATIC1111's infotext. Returns what has no flag (the scheduler
    config overrides) and the scheduler the image was drawn with."""
    from sdrt.runtime.errors import GenerationError
    from sdrt.runtime.images import read_parameters

    if not Path(args.from_png).is_file():
        raise UserError(f"--from-png {args.from_png} does not exist")
    try:
        rec = read_parameters(args.from_png)
    except GenerationError as e:
        raise UserError(str(e)) from e
    for flag, key in _PNG_FLAGS.items():
        value = rec.get(key)
        if getattr(args, flag) is None and value is not None:
            setattr(args, flag, value[0] if flag in ("prompt", "negative_prompt") and isinstance(value, list) else value)
    if args.lora is None and rec.get("loras"):
        args.lora = [f"{p}:{w}" for p, w in rec["loras"]]
    args.vae_tiling = args.vae_tiling or bool(rec.get("vae_tiling"))  # tiles change the pixels along the seams
    if args.model is None:
        path, name = rec.get("model_path"), rec.get("model")
        if path and Path(path).is_dir():
            args.model = path
        elif name and name != Path(_default_model()).name:
            raise UserError(f"{args.from_png} was drawn with the model {name!r}, which is not here; pass --model DIR")
    return {"scheduler": args.scheduler if rec.get("scheduler") == args.scheduler else None,
            "scheduler_config": rec.get("scheduler_config")}


# Pipeline argument names -> the `sdrt generate` flags that set them, for error messages.
_GENERATE_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "num_images_per_prompt": "--num-images",
    "negative_prompt": "--negative-prompt",
    "prompt_syntax": "--prompt-syntax",
    "mask_image": "--mask",
    "without image": "without --init-image",
    "needs image and": "needs --init-image and",
    "but image is": "but --init-image is",
    "strength": "--strength",
    "height": "--height",
    "width": "--width",
    "controlnet_conditioning_scale": "--control-scale",
    "control_image": "--control-image",
    "controlnet=NAME": "--control-image PATH:NAME",
}


def _as_flags(message: str) -> str:
    """A library message, which names Pipeline arguments, with the flags a CLI user types instead."""
    import re

    for name, flag in _GENERATE_FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


def _cmd_build(args) -> int:
    from sdrt.export.build import BuildError, build_engines, summary_table
    from sdrt.runtime.backends import BackendUnavailable
    from sdrt.runtime.manifest import ModelDirError

    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    try:
        rows = build_engines(
            args.model_dir,
            components=components,
            height=args.height,
            width=args.width,
            min_height=args.min_height,
            max_height=args.max_height,
            min_width=args.min_width,
            max_width=args.max_width,
            batch=args.batch,
            max_batch=args.max_batch,
            static=args.static,
            fp16_vae=args.fp16_vae,
            timing_cache=args.timing_cache,
            optimization_level=args.optimization_level,
            workspace_gib=args.workspace,
            force=args.force,
            refittable=args.refittable,
        )
    except (BuildError, BackendUnavailable, ModelDirError, ValueError) as e:
        raise UserError(str(e)) from e
    print()
    print(summary_table(rows))
    return 0


def _cmd_quantize(args) -> int:
    from sdrt.runtime.errors import SdrtError

    try:
        from sdrt.export.quantize import quantize_model

        prompts = None
        if args.prompts:
            prompts = [ln.strip() for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        variant = quantize_model(args.model_dir, method=args.method, prompts=prompts, num_prompts=args.num_prompts,
                                 steps=args.steps, height=args.height, width=args.width, guidance=args.guidance,
                                 seed=args.seed)
    except (SdrtError, OSError, ValueError) as e:
        raise UserError(str(e)) from e
    print(f"wrote {variant['file']} ({variant['size_bytes'] / 2**20:.1f} MiB, {variant['method']}); "
          f"run it with `sdrt generate --model {args.model_dir} --precision int8`")
    return 0


def _cmd_bench(args) -> int:
    from sdrt.benchmarks.bench import BenchError, exit_code, run

    try:
        report = run(args)
    except BenchError as e:
        raise UserError(str(e)) from e
    print("\n".join(report["summary"]))
    return exit_code(report)


def _cmd_serve(args) -> int:
    from sdrt.serve.server import ServeError, run

    try:
        return run(args)
    except ServeError as e:
        raise UserError(str(e)) from e


def _default_model() -> str:
    from sdrt.runtime.default_model import default_model_dir

    path = default_model_dir()
    if path is None:
        raise UserError("no --model given and no built-in default model is installed; pass --model DIR (see `sdrt export`)")
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    ap = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion export and torch-free inference runtime.")
    ap.add_argument("--version", action="version", version=f"sdrt {__version__}")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a diffusers checkpoint to an sdrt model directory (ONNX)")
    p.add_argument("checkpoint", help="a local diffusers folder, or a .safetensors/.ckpt file with --config")
    p.add_argument("--out", required=True, help="model directory to write (replaced atomically with --overwrite)")
    p.add_argument("--config", help="for a single-file checkpoint: a local diffusers config folder of the same architecture")
    p.add_argument("--fp16", action="store_true", help="fp16 text encoder and UNet graphs (for GPUs)")
    p.add_argument("--fp16-vae", action="store_true", help="with --fp16, the VAE in fp16 too (may overflow into NaN)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer; default 17)")
    p.add_argument("--default-guidance", type=float, metavar="G",
                   help="record the guidance scale this model is meant to run with (used when a call gives none)")
    p.add_argument("--default-steps", type=int, metavar="N",
                   help="record the denoising steps this model is meant to run with (used when a call gives none)")
    p.add_argument("--vae", metavar="DIR",
                   help="export this diffusers VAE folder (AutoencoderKL, or AutoencoderTiny: TAESD) instead of the "
                        "checkpoint's own, as diffusers' vae= argument")
    p.add_argument("--controlnet", action="append", metavar="DIR",
                   help="also export this diffusers ControlNetModel folder, as controlnet/<folder name>/ beside the "
                        "model (and a UNet graph that takes its residuals); repeatable")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate images from a prompt with a model directory")
    p.add_argument("prompt", nargs="?", help="what to draw (with --from-png: the PNG's own unless given)")
    p.add_argument("--from-png", metavar="FILE",
                   help="take the prompt and settings from a PNG's generation parameters (sdrt's, or AUTOMATIC1111's "
                        "infotext); flags given here win")
    p.add_argument("--model", help="sdrt model directory (default: the built-in default model)")
    p.add_argument("--out", default="out.png", help="PNG path; several images get -0, -1, ... suffixes (default out.png)")
    p.add_argument("--negative-prompt", help="what the image should not show")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's own, else 50)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (default: the model's own, else 7.5; 5.0 for SDXL)")
    p.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_NAMES)} (default: the checkpoint's own)")
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=int, help="images per prompt (default 1)")
    p.add_argument("--prompt-syntax", choices=("none", "compel", "a1111"),
                   help="read weighting syntax and prompts past 77 tokens as compel or AUTOMATIC1111 do "
                        "(default none: diffusers' 77 tokens, no weighting)")
    p.add_argument("--init-image", help="image to image: the starting image; with --mask, the image to inpaint")
    p.add_argument("--mask", help="inpainting: a mask of the init image's size, white (>= 50%%) repainted, black kept")
    p.add_argument("--strength", type=float,
                   help="how much of the image to change, in (0, 1] (default 0.8; 1.0 for inpainting)")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, tensorrt or openvino (default auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="fp32 (default), bf16 (openvino, on CPUs with AVX-512 BF16 or AMX) or int8 (the UNet "
                        "`sdrt quantize` wrote; ort-cpu or openvino)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="TensorRT: capture the UNet call once as a CUDA graph and replay it every step")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA (safetensors file or diffusers folder) at SCALE (default 1); repeatable")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode) in overlapping tiles, as diffusers' vae.enable_tiling(): less memory for large images")
    p.add_argument("--refiner", metavar="DIR",
                   help="SDXL: hand the base's latents to this refiner model directory for the last steps")
    p.add_argument("--refiner-start", type=float,
                   help="with --refiner: the fraction of the schedule the base runs (default 0.8)")
    p.add_argument("--control-image", action="append", metavar="PATH[:NAME]",
                   help="ControlNet: condition on this image, with the ControlNet NAME of the model (default: one image "
                        "per exported ControlNet, in order); repeatable")
    p.add_argument("--control-scale", action="append", type=float, metavar="S",
                   help="ControlNet conditioning scale (default 1); one for all, or one per --control-image, in order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("build", help="build TensorRT engines for this GPU from a model directory's ONNX")
    p.add_argument("model_dir")
    p.add_argument("--components", help="comma-separated: text_encoder, text_encoder_2, unet, vae_decoder, "
                   "vae_encoder (default: all)")
    p.add_argument("--height", type=int, help="optimal image height (default: the model's native size)")
    p.add_argument("--width", type=int, help="optimal image width (default: the model's native size)")
    p.add_argument("--min-height", type=int, help="smallest image height (default: half the optimal)")
    p.add_argument("--max-height", type=int, help="largest image height (default: 1.5 x the optimal)")
    p.add_argument("--min-width", type=int, help="smallest image width (default: half the optimal)")
    p.add_argument("--max-width", type=int, help="largest image width (default: 1.5 x the optimal)")
    p.add_argument("--batch", type=int, help="optimal images per call (default 1; the UNet gets twice that for guidance)")
    p.add_argument("--max-batch", type=int, help="most images per call (default: --batch)")
    p.add_argument("--static", action="store_true", help="one shape only: --height x --width, --batch images")
    p.add_argument("--fp16-vae", action="store_true", help="the VAE in fp16 too (default fp32/TF32: fp16 may overflow)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file: loaded if present, saved after each build")
    p.add_argument("--optimization-level", type=int, help="TensorRT builder optimization level 0..5 (default 3)")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--refittable", action="store_true",
                   help="engines whose weights can be replaced at run time (TensorRT refit: LoRA without a rebuild)")
    p.set_defaults(func=_cmd_build)

    from sdrt.benchmarks.bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="benchmark sdrt against diffusers: latency, memory, image check, side by side")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    from sdrt.serve.server import add_arguments as add_serve_arguments

    p = sub.add_parser("serve", help="serve the OpenAI Images API and AUTOMATIC1111's API over HTTP (needs [serve])")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("quantize", help="write an int8 UNet into a model directory, calibrated on its own denoising runs")
    p.add_argument("model_dir")
    p.add_argument("--method", default="auto", choices=("auto", "ort-static", "nncf"),
                   help="auto (default): nncf on a CPU with VNNI where NNCF is installed, else ort-static; "
                        "ort-static: ONNX Runtime static quantization, QDQ (ort-cpu and openvino run it); "
                        "nncf: NNCF hybrid mode as optimum-intel's, an OpenVINO IR (openvino only)")
    p.add_argument("--prompts", metavar="FILE", help="calibration prompts, one a line (default: 8 built-in ones)")
    p.add_argument("--num-prompts", type=int, help="use the first N calibration prompts")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per calibration run (default 10)")
    p.add_argument("--height", type=int, help="calibration image height (default: the model's native size)")
    p.add_argument("--width", type=int, help="calibration image width (default: the model's native size)")
    p.add_argument("--guidance", type=float, help="guidance scale of the calibration runs (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration run (default 0)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("import", help="write an sdrt model directory from one in optimum's ONNX layout")
    p.add_argument("source", help="a directory written by `optimum-cli export onnx --task text-to-image`")
    p.add_argument("--out", required=True, help="model directory to write (replaced atomically with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("info", help="describe a model directory: components, shapes, precisions, engines")
    p.add_argument("model_dir")
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 against sdrt.json instead; exit 1 when any differs")
    p.set_defaults(func=_cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "opset", 17) < 17:
        ap.error(f"--opset {args.opset} is too old; sdrt exports with opset 17 or newer")
    try:
        return args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
