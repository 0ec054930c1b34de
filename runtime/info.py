"""Human-readable description of a model directory (``sdrt info``)."""

from __future__ import annotations

from pathlib import Path

from .manifest import load_manifest


def _shape(shape: list) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def describe(model_dir: str | Path) -> str:
    m = load_manifest(model_dir)
    lines = [
        f"{Path(model_dir)}: sdrt model directory, format {m['format_version']}, written by sdrt {m.get('sdrt_version', '?')}",
        f"  family {m['family']}, task {m.get('task', 'text-to-image')}, prediction {m['prediction_type']}, native {m['native_resolution']}x{m['native_resolution']}, "
        f"latent channels {m['latent_channels']}"
        + (f", UNet input channels {m['unet_in_channels']}" if "unet_in_channels" in m else "")
        + f", VAE scale {m['vae_scale_factor']} (scaling factor {m['vae_scaling_factor']}"
        + (f", shift {m['vae_shift_factor']}" if m.get("vae_shift_factor") is not None else "")
        + ")",
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
        lines.append(f"  {name:<15} {c['precision']:<5} {c['size_bytes'] / 2**20:8.1f} MiB  {c['file']}{ext}  ({err})")
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
