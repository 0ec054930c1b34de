"""The benchmark report's human-readable forms: sdrt / diffusers ratios, the printed summary, the markdown
table and the per-stage chart (matplotlib, from the `[bench]` extra)."""

from __future__ import annotations

STAGES = (("text_encoder", "text encoder"), ("unet_total", "UNet"), ("vae_decoder", "VAE decode"), ("other", "other"))


def _med(res: dict, key: str):
    s = (res.get("latency_s") or {}).get(key)
    return s["median"] if s else None


def _ok(res: dict) -> bool:
    return res.get("status") == "ok"


def time_to_ready(res: dict):
    """Seconds from process start to a loaded pipeline: the imports, then ``Pipeline.load`` (diffusers:
    ``from_pretrained``); what engines compile or import at their first call is in the cold start instead."""
    parts = (res.get("import_s"), res.get("load_s"))
    return None if None in parts else sum(parts)


def ratios(report: dict) -> dict:
    """{sdrt contender: {end_to_end, unet_step, peak_rss, cold_start, time_to_ready}} as sdrt / diffusers (below 1: sdrt
    is faster or smaller). Only where both ran."""
    from .stats import ratio

    cs = report.get("contenders", {})
    ref = cs.get(report.get("reference", "diffusers"), {})
    if not _ok(ref):
        return {}
    out = {}
    for name, res in cs.items():
        if not name.startswith("sdrt-") or not _ok(res):
            continue
        out[name] = {
            "end_to_end": ratio(_med(res, "end_to_end"), _med(ref, "end_to_end")),
            "unet_step": ratio(_med(res, "unet_step"), _med(ref, "unet_step")),
            "peak_rss": ratio(res.get("peak_rss_bytes"), ref.get("peak_rss_bytes")),
            "cold_start": ratio(res.get("cold_start_s"), ref.get("cold_start_s")),
            "time_to_ready": ratio(time_to_ready(res), time_to_ready(ref)),
            "peak_gpu": ratio(res.get("peak_gpu_bytes"), ref.get("peak_gpu_bytes")),
            "image_matches": res.get("image_matches"),
        }
    return out


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def summary_lines(report: dict) -> list[str]:
    s = report["settings"]
    m = report["machine"]
    lines = [
        f"sdrt bench: {s['height']}x{s['width']}, {s['steps']} steps, scheduler {s['scheduler'] or 'default'}, "
        f"guidance {s['guidance']}, batch {s['batch']}, {s['warmup']} warm-up + {s['runs']} timed runs; "
        f"{m['cpu_model']} ({m['cpu_physical_cores']} cores){', ' + m['gpu'] if m.get('gpu') else ''}",
    ]
    ranked = rank(report)
    for name, res in report["contenders"].items():
        if not _ok(res):
            lines.append(f"  {name}: {res.get('status')} ({res.get('reason')})")
            continue
        e2e = res["latency_s"]["end_to_end"]
        step = res["latency_s"]["unet_step"]
        flag = "" if res.get("image_matches") is not False else f"  !! {res.get('image_note')}"
        if res.get("kind") == "sdrt" and res.get("forbidden_modules_loaded"):
            flag += f"  !! the sdrt worker imported {', '.join(res['forbidden_modules_loaded'])}"
        diff = res.get("image_max_abs_diff")
        lines.append(
            f"  {name}: end-to-end {e2e['median']:.3f}s (p90 {e2e['p90']:.3f}, min {e2e['min']:.3f}), "
            f"UNet step {step['median'] * 1e3:.1f} ms, cold start {_fmt_s(res.get('cold_start_s'))}, "
            f"ready {_fmt_s(time_to_ready(res))}, "
            f"peak RSS {_mib(res.get('peak_rss_bytes'))} MiB"
            + (f", peak GPU {_mib(res.get('peak_gpu_bytes'))} MiB" if res.get("peak_gpu_bytes") is not None else "")
            + (f", max |diff| {diff:.2e}" if diff is not None else "")
            + (f", PSNR {res['image_psnr_db']:.1f} dB" if res.get("image_psnr_db") not in (None, float("inf")) else "")
            + flag
        )
    for name, r in report.get("ratios", {}).items():
        tag = "" if r.get("image_matches") is not False else "  (image mismatch: not a valid comparison)"
        lines.append(
            f"{name} / {report['reference']}: end-to-end {_x(r['end_to_end'])}, UNet step {_x(r['unet_step'])}, "
            f"peak RSS {_x(r['peak_rss'])}, cold start {_x(r['cold_start'])}, time to ready {_x(r.get('time_to_ready'))}"
            + (f", peak GPU {_x(r['peak_gpu'])}" if r.get("peak_gpu") is not None else "") + tag
        )
    if ranked:
        lines.append("ranking (end-to-end median, matching images only): " + " < ".join(ranked))
    return lines


def rank(report: dict) -> list[str]:
    """Contenders that ran and whose image matches (or is the reference), fastest first."""
    ok = [(n, r) for n, r in report["contenders"].items() if _ok(r) and r.get("image_matches") is not False]
    return [n for n, r in sorted(ok, key=lambda nr: _med(nr[1], "end_to_end"))]


def _db(v) -> str:
    return "n/a" if v is None else "identical" if v == float("inf") else f"{v:.1f}"


def isa_text(isa: dict | None) -> str:
    """'AVX2 yes, AVX-512 yes, VNNI yes, BF16 yes, AMX no' from machine_facts' cpu_isa."""
    if not isa:
        return "unknown"
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "bf16": "BF16", "amx": "AMX"}
    return ", ".join(f"{label} {'yes' if isa.get(k) else 'no'}" for k, label in names.items())


def _fmt_s(v) -> str:
    return "n/a" if v is None else f"{v:.2f}s"


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.0f}"


def _ms(res, key) -> str:
    v = _med(res, key)
    return "n/a" if v is None else f"{v * 1e3:.1f}"


def _gflops(v) -> str:
    return "n/a" if v is None else f"{v / 1e9:.1f}"


def markdown(report: dict) -> str:
    s, m, roof = report["settings"], report["machine"], report.get("roofline", {})
    v = m["versions"]
    out = [
        "# sdrt bench",
        "",
        f"- workload: {s.get('workload') or 'custom'}; checkpoint `{s.get('checkpoint')}`, model `{s['model']}`",
        f"- {s['height']}x{s['width']}, {s['steps']} steps, scheduler {s['scheduler'] or 'checkpoint default'}, "
        f"guidance {s['guidance']}, batch {s['batch']}, seed {s['seed']}; {s['warmup']} warm-up + {s['runs']} timed runs "
        f"per contender, each in its own process, same initial latents; page cache "
        f"{'warmed before each contender (its files read once)' if s.get('page_cache', 'warm') == 'warm' else 'as the previous contenders left it'}; "
        f"sdrt's engine caches {'filled before its cold start' if s.get('engine_cache', 'warm') == 'warm' else 'as found'}",
        f"- machine: {m['cpu_model']}, {m['cpu_physical_cores']} physical / {m['cpu_logical_cores']} logical cores"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; threads: {s.get('threads') or 'library default'}",
        f"- CPU ISA: {isa_text(m.get('cpu_isa'))}",
        f"- versions: sdrt {v.get('sdrt')}, numpy {v.get('numpy')}, onnxruntime {v.get('onnxruntime') or v.get('onnxruntime-gpu')}, "
        f"torch {v.get('torch')}, diffusers {v.get('diffusers')}",
        f"- created {report['created']}",
        "",
        "| contender | device / precision | end-to-end median s (p90, min) | text encoder ms | UNet step ms | "
        "UNet GFLOP/s (% of peak) | VAE decode ms | cold start s | time to ready s | peak RSS MiB | peak GPU MiB | max abs diff vs "
        f"{report['reference']} | PSNR vs fp32 dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = rank(report)
    order = ranked + [n for n, r in report["contenders"].items() if _ok(r) and n not in ranked]
    for name in order:
        r = report["contenders"][name]
        e2e = r["latency_s"]["end_to_end"]
        rf = r.get("roofline") or {}
        frac = rf.get("fraction_of_peak")
        diff = r.get("image_max_abs_diff")
        flag = " **MISMATCH, not ranked**" if r.get("image_matches") is False else ""
        out.append(
            f"| {name}{flag} | {r.get('device')} / {r.get('precision')} | {e2e['median']:.3f} ({e2e['p90']:.3f}, {e2e['min']:.3f}) "
            f"| {_ms(r, 'text_encoder')} | {_ms(r, 'unet_step')} | {_gflops(rf.get('achieved_flops_per_s'))}"
            f"{'' if frac is None else f' ({frac:.0%})'} | {_ms(r, 'vae_decoder')} | {_fmt_s(r.get('cold_start_s'))} "
            f"| {_fmt_s(time_to_ready(r))} "
            f"| {_mib(r.get('peak_rss_bytes'))} | {_mib(r.get('peak_gpu_bytes'))} "
            f"| {'n/a' if diff is None else f'{diff:.2e}'} | {_db(r.get('image_psnr_db'))} |"
        )
    skipped = [(n, r) for n, r in report["contenders"].items() if not _ok(r)]
    if skipped:
        out += ["", "Not run:", ""]
        out += [f"- {n}: {r.get('status')}: {r.get('reason')}" for n, r in skipped]
    notes = [(n, r["image_note"]) for n, r in report["contenders"].items() if r.get("image_note")]
    notes += [(n, f"the sdrt worker imported {', '.join(r['forbidden_modules_loaded'])} (it must stay torch-free)")
              for n, r in report["contenders"].items() if r.get("kind") == "sdrt" and r.get("forbidden_modules_loaded")]
    notes += [(n, "its cold start filled engine caches (" + ", ".join(c for c, st in r["engine_cache"].items()
                                                                   if st == "filled") + "): a first launch's, not a second's")
              for n, r in report["contenders"].items() if "filled" in (r.get("engine_cache") or {}).values()]
    if notes:
        out += ["", "Checks:", ""] + [f"- {n}: {note}" for n, note in notes]
    if report.get("ratios"):
        out += ["", f"## sdrt / {report['reference']}", "",
                "| contender | end-to-end | UNet step | peak RSS | cold start | time to ready | peak GPU |",
                "|---|---|---|---|---|---|---|"]
        for n, r in report["ratios"].items():
            tag = " (image mismatch)" if r.get("image_matches") is False else ""
            out.append(f"| {n}{tag} | {_x(r['end_to_end'])} | {_x(r['unet_step'])} | {_x(r['peak_rss'])} "
                       f"| {_x(r['cold_start'])} | {_x(r.get('time_to_ready'))} | {_x(r.get('peak_gpu'))} |")
    unet = roof.get("unet") or {}
    if roof:
        out += ["", "## Roofline", ""]
        if "flops" in unet:
            out.append(f"- UNet: {unet['flops'] / 1e9:.2f} GFLOP per call at latent shape {unet['latent_shape']} "
                       f"(2 x MACs of Conv/ConvTranspose/MatMul/Gemm from the ONNX graph: "
                       + ", ".join(f"{k} {x / 1e9:.2f}" for k, x in unet['by_op'].items()) + ")"
                       + (f"; {len(unet['unresolved_nodes'])} nodes of unknown shape not counted" if unet.get("unresolved_nodes") else ""))
        elif unet.get("error"):
            out.append(f"- UNet FLOPs: not counted ({unet['error']})")
        for key in ("cpu_fp32", "gpu_fp32", "gpu_fp16"):
            e = roof.get(key)
            if not e:
                continue
            if e.get("status") == "ok":
                threads = f", {e['threads']} threads" if e.get("threads") else ""
                out.append(f"- {key} peak: {e['flops_per_s'] / 1e9:.1f} GFLOP/s — {e['library']}, {e['method']}{threads}")
            else:
                out.append(f"- {key} peak: not measured ({e.get('reason')})")
    if (report.get("outputs") or {}).get("chart"):
        out += ["", "![per-stage latency](bench.png)"]
    return "\n".join(out) + "\n"


def write_chart(report: dict, path) -> str | None:
    """Per-stage stacked horizontal bars (median seconds) per contender; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'sdrt[bench]')"
    rows = [(n, r) for n, r in report["contenders"].items() if _ok(r)]
    if not rows:
        return "no contender ran"
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(rows)))
    labels = [n + (" (mismatch)" if r.get("image_matches") is False else "") for n, r in rows]
    left = [0.0] * len(rows)
    for key, label in STAGES:
        vals = [_med(r, key) or 0.0 for _, r in rows]
        ax.barh(labels, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image batch (median)")
    s = report["settings"]
    ax.set_title(f"{s['height']}x{s['width']}, {s['steps']} steps, batch {s['batch']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
