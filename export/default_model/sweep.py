"""Train several variants of the default model side by side (one process each) and score them.

    python -m sdrt.export.default_model.sweep --out DIR [--only A,B] [train options, e.g. --device cuda --eval-n 64]

Each variant is ``train.main`` with some architecture overrides (module-level configs) and its own
arguments; its log goes to DIR/NAME.log and its checkpoint to DIR/NAME.tgz, in float16 (or
``--pack-dtype float32``) and split into NAME.tgz.00, .01, ... above ``--part-mib`` (15): a lent GPU
machine hands back files of at most 16 MiB. Used to choose the default model's recipe on a GPU in minutes
instead of one CPU-hour per try (docs/default-model-sweep.md has the results); options it does not
know go to every variant's ``train`` and win over the variant's own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

WIDE = {"block_out_channels": [64, 128, 128], "attention_head_dim": 8}
LONG = ["--vae-minutes", "1.1", "--vae-batch", "32", "--unet-minutes", "3.4", "--batch", "128", "--unet-lr", "2e-3",
        "--n-train", "12000", "--decoder-minutes", "0.3", "--decoder-batch", "16", "--object-weight", "4"]
VARIANTS = {
    # the first shipped model's CPU recipe (the steps 2 CPU cores reached in 11 + 62 minutes), with the object weight
    "A_cpu_recipe_objw": ({}, {}, ["--vae-steps", "1139", "--unet-steps", "4200", "--decoder-minutes", "0",
                                   "--object-weight", "4", "--cap-minutes", "4.0"]),
    "B_long": ({}, {}, LONG),
    "C_long_wide": (WIDE, {}, LONG),
    "D_long_latent8": ({"in_channels": 8, "out_channels": 8}, {"latent_channels": 8}, LONG),
    # round 2 (the object weight lifted colour from 0.09 to 0.9 but cost position; fewer processes, longer)
    "E_wide_objw2": (WIDE, {}, LONG + ["--object-weight", "2", "--vae-minutes", "1.0", "--unet-minutes", "3.8"]),
    "F_wide_objw4_gamma20": (WIDE, {}, LONG + ["--snr-gamma", "20", "--vae-minutes", "1.0", "--unet-minutes", "3.8"]),
    "H_base_objw2": ({}, {}, LONG + ["--object-weight", "2", "--vae-minutes", "1.0", "--unet-minutes", "3.8"]),
    # round 3: the tokenizer had capped every GPU run at ~10 UNet steps/s (now cached per word); H's recipe
    # with two processes instead of three or four, batch 512, 20000 scenes and 6.8 UNet minutes, and
    # H with F's larger min-SNR gamma (it helped training-distribution shapes)
    "I_base_objw2_b512": ({}, {}, LONG + ["--object-weight", "2", "--vae-minutes", "1.0", "--unet-minutes", "6.8",
                                          "--batch", "512", "--n-train", "20000"]),
    "J_base_objw2_b512_gamma20": ({}, {}, LONG + ["--object-weight", "2", "--vae-minutes", "1.0", "--unet-minutes",
                                                  "6.8", "--batch", "512", "--n-train", "20000", "--snr-gamma", "20"]),
}


def child(name: str, out: Path, argv: list[str]) -> int:
    from . import train

    unet, vae, args = VARIANTS[name]
    train.UNET.update(unet)
    train.VAE.update(vae)
    return train.main(["--out", str(out / name)] + args + argv)


def pack(ckpt: Path, dest: Path, half: bool = True, part_mib: float | None = None) -> list[Path]:
    """Tar+gzip a checkpoint to ``dest`` (float tensors in float16 when ``half``). With ``part_mib``, an
    archive larger than that is split into ``dest.00``, ``dest.01``, ... (``cat dest.* > dest`` joins
    them): a lent GPU machine hands back files of at most 16 MiB. Returns the files written."""
    from safetensors.torch import load_file, save_file

    for old in dest.parent.glob(f"{dest.name}.[0-9][0-9]"):  # an earlier run's parts
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(dest, "w:gz") as tar:
            for f in sorted(ckpt.rglob("*")):
                if not f.is_file():
                    continue
                arc = f.relative_to(ckpt.parent)
                if f.suffix == ".safetensors" and half:
                    t = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(f).items()}
                    g = Path(tmp) / f.name
                    save_file(t, g)
                    tar.add(g, arcname=str(arc))
                else:
                    tar.add(f, arcname=str(arc))
    part = None if part_mib is None or part_mib <= 0 else max(1, int(part_mib * 2**20))
    if part is None or dest.stat().st_size <= part:
        return [dest]
    parts = []
    with open(dest, "rb") as src:
        while chunk := src.read(part):
            parts.append(dest.with_name(f"{dest.name}.{len(parts):02d}"))
            parts[-1].write_bytes(chunk)
    dest.unlink()
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.export.default_model.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sweep")
    ap.add_argument("--pack-dtype", choices=("float16", "float32"), default="float16",
                    help="float type of the packed checkpoints' weights")
    ap.add_argument("--part-mib", type=float, default=15.0,
                    help="split packed checkpoints larger than this many MiB (0: never)")
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, args.work, rest)
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        log = open(args.out / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, "-u", "-m", __spec__.name, "--out", str(args.out), "--child",
                                        name, "--work", str(args.work)] + rest, stdout=log, stderr=subprocess.STDOUT)
    summary = {}
    for name, p in procs.items():
        rc = p.wait()
        if rc == 0:
            pack(args.work / name, args.out / f"{name}.tgz", half=args.pack_dtype == "float16", part_mib=args.part_mib)
        lines = [ln for ln in (args.out / f"{name}.log").read_text().splitlines() if "] " in ln and "%|" not in ln]
        summary[name] = {"rc": rc, "tail": [ln for ln in lines if any(k in ln for k in ("done", "eval", "reconstruction"))]}
        print(name, json.dumps(summary[name], indent=1), flush=True)
    return 0 if all(v["rc"] == 0 for v in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
