"""The ``sdrt`` command: export, info (build, generate and bench as their parts land)."""

from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, no traceback."""


def _cmd_export(args) -> int:
    from sdrt.export.checkpoint import CheckpointError
    from sdrt.export.exporter import ExportError, export_model

    try:
        manifest = export_model(
            args.checkpoint,
            args.out,
            config=args.config,
            fp16=args.fp16,
            fp16_vae=args.fp16_vae,
            overwrite=args.overwrite,
            opset=args.opset,
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


def _cmd_info(args) -> int:
    from sdrt.runtime.info import describe
    from sdrt.runtime.manifest import ModelDirError

    try:
        print(describe(args.model_dir))
    except ModelDirError as e:
        raise UserError(str(e)) from e
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__

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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="describe a model directory: components, shapes, precisions, engines")
    p.add_argument("model_dir")
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
