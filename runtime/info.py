"""Human-readable description of a model directory (``sdrt info``), and its check against the manifest's
sha256 records (``sdrt info --verify``)."""

from __future__ import annotations

from pathlib import Path

from .files import sha256_file
from .manifest import load_manifest


def _shape(shape: list) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def describe(model_dir: str | Path) -> str:
    m = load_manifest(model_dir)
    lines = [
        f"{Path(model_dir)}: sdrt model directory, format {m['format_version']}, written by sdrt {m.get('sdrt_version', '?')}",
        f"  family {m['family']}, task {m.get('task', 'text-to-image')}, prediction {m.get('prediction_type', '?')}, native {m['native_resolution']}x{m['native_resolution']}, "
        f"latent channels {m['latent_channels']}"
        + (f", UNet input channels {m['unet_in_channels']}" if "unet_in_channels" in m else "")
        + f", VAE scale {m['vae_scale_factor']} (scaling factor {m['vae_scaling_factor']}"
        + (f", shift {m['vae_shift_factor']}" if m.get("vae_shift_factor") is not None else "")
        + ")",
        *([f"  VAE {m['vae']['class']}" + (f" from {m['vae']['source']}" if m["vae"].get("source") else "")
           + (f", tiles {m['vae']['tiling']['sample_size']} px" if m["vae"].get("tiling") else "")] if m.get("vae") else []),
        f"  scheduler {m.get('scheduler_class')}; tokenizer max length {m['tokenizers'][0]['max_length']}",
        *(["  generation defaults: " + ", ".join(f"{k} {v}" for k, v in m["generation_defaults"].items())]
          if m.get("generation_defaults") else []),
        "",
        "components:",
    ]
    for name, c in m["components"].items():
        val = c.get("validation", {})
        err = f"validated: max abs {val['max_abs_error']:.1e}, rel {val['max_rel_error']:.1e}" if "max_abs_error" in val else "not validated"
        ext = " + external data" if c.get("external_data") else ""
        size = f"{c['size_bytes'] / 2**20:8.1f} MiB" if "size_bytes" in c else "       ? MiB"
        lines.append(f"  {name:<15} {c.get('precision', '?'):<5} {size}  {c['file']}{ext}  ({err})")
        for t in c["inputs"]:
            lines.append(f"      in  {t['name']:<22} {t['dtype']:<8} {_shape(t['shape'])}")
        for t in c["outputs"]:
            lines.append(f"      out {t['name']:<22} {t['dtype']:<8} {_shape(t['shape'])}")
    engines = m.get("engines") or {}
    lines.append("")
    if not engines:
        lines.append("engines: none (build them for this GPU with `sdrt build`)")
    else:
        lines.append("engines:")
        for key, e in engines.items():
            lines.append(f"  {key}: TensorRT {e.get('tensorrt_version', '?')} on {e.get('gpu_name', '?')} (sm {e.get('compute_capability', '?')})")
            for comp, rec in e.get("components", {}).items():
                lines.append(f"      {comp:<15} {rec.get('precision', '?'):<5} {rec.get('file', '')}")
    return "\n".join(lines)


def verify(model_dir: str | Path) -> tuple[list[str], list[str]]:
    """(files checked, one line for each that is missing or whose sha256 differs from its record): every
    component's graph and external data, and every TensorRT plan whose record has a sha256 (older builds have none)."""
    root, m = Path(model_dir), load_manifest(model_dir)
    recorded = [(c.get(f), c.get(h)) for c in m["components"].values()
                for f, h in (("file", "sha256"), ("external_data", "external_data_sha256"))]
    recorded += [(e.get("file"), e.get("sha256")) for entry in (m.get("engines") or {}).values()
                 for e in entry["components"].values()]
    checked, bad = [], []
    for rel, want in recorded:
        if not rel or not want:
            continue
        checked.append(rel)
        if not (root / rel).is_file():
            bad.append(f"{rel}: missing")
        elif (got := sha256_file(root / rel)) != want:
            bad.append(f"{rel}: sha256 {got[:16]}..., sdrt.json records {want[:16]}...")
    return checked, bad
