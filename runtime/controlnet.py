"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
the model directory's ControlNets, a call's control arguments checked, and each ControlNet engine as a
callable that the loop's ``with_controlnet`` wrapper runs before every UNet call.

As diffusers' StableDiffusion[XL]ControlNet{,Img2Img,Inpaint}Pipeline: the control image resized to the
call's size, RGB in [0, 1] (VaeImageProcessor with do_normalize=False), one row per image of the batch and
doubled under classifier-free guidance; each ControlNet sees the UNet's (scaled) latents, timestep and
conditioning; its residuals are multiplied by ``controlnet_conditioning_scale`` times ``controlnet_keep``
(0 outside [control_guidance_start, control_guidance_end] of the steps) and summed over the ControlNets
(MultiControlNetModel), then fed to the ``unet_controlnet`` graph, a UNet that takes them as inputs. The plain
``unet`` graph is untouched, so a call without a control image runs as fast as before. guess_mode is not
supported (diffusers' default, False).

The manifest records (sdrt.json):

    "controlnet_unet": "unet_controlnet",
    "controlnets": [{"name": "canny", "component": "controlnet.canny", "conditioning_input": "controlnet_cond",
                     "conditioning_channels": 3, "residuals": [{"name": ..., "shape": [...]}, ...], ...}]

The ControlNets' residual outputs and the unet_controlnet's residual inputs have the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import GenerationError

CONTROLNET_FOLDER = "controlnet"  # controlnet/<name>/model.onnx in the model directory
COMPONENT_PREFIX = "controlnet."  # a ControlNet's key in the manifest's components: controlnet.<name>
CONTROLNET_UNET = "unet_controlnet"  # the UNet graph that also takes the residuals


def component_name(name: str) -> str:
    return COMPONENT_PREFIX + name


def is_controlnet(component: str) -> bool:
    return component.startswith(COMPONENT_PREFIX)


def records(manifest: dict) -> list[dict]:
    """The model's ControlNets, in export order (empty for a model exported without --controlnet)."""
    return list(manifest.get("controlnets") or [])


@dataclass
class Control:
    """One ControlNet's part of a call: its record, its image rows (B, 3, H, W) in [0, 1], its scale and the
    fraction of the steps it acts in."""

    record: dict
    image: np.ndarray
    scale: float
    start: float
    end: float

    @property
    def name(self) -> str:
        return self.record["name"]

    def keep(self, i: int, n: int) -> float:
        """diffusers' controlnet_keep for step ``i`` of ``n``: 1 inside [start, end] of the steps, else 0."""
        return 1.0 - float(i / n < self.start or (i + 1) / n > self.end)


def _per_net(value, n: int, what: str, names: list[str]) -> list:
    """A float or a list of one per ControlNet, as diffusers broadcasts them."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GenerationError(f"{what} has {len(value)} entries for {n} ControlNets ({', '.join(names)}); "
                                  "give one number, or one per ControlNet")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not np.isfinite(v):
            raise GenerationError(f"{what} must be a finite number or a list of them, got {v!r}")
    return [float(v) for v in values]


def select(manifest: dict, controlnet) -> list[dict]:
    """The records a call's ``controlnet`` (None: every exported ControlNet, in export order; a name; a list
    of names) names; GenerationError naming what the model has otherwise."""
    recs = records(manifest)
    if not recs:
        raise GenerationError("this model has no ControlNet; export one beside it with "
                              "`sdrt export CHECKPOINT --out DIR --controlnet CONTROLNET_DIR`")
    if controlnet is None:
        return recs
    names = [controlnet] if isinstance(controlnet, str) else controlnet
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise GenerationError(f"controlnet must be None, a name or a list of names, got {controlnet!r}")
    by_name = {r["name"]: r for r in recs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise GenerationError(f"no ControlNet named {', '.join(map(repr, unknown))} in this model; it has "
                              f"{', '.join(by_name)}")
    return [by_name[n] for n in names]


def controls(manifest: dict, control_image, scale, start, end, controlnet, load_image) -> list[Control]:
    """A call's control arguments checked, as diffusers' ControlNet pipelines check them: one image (or a list,
    one per prompt) for one ControlNet; for several, a list with one entry per ControlNet; the scale and the
    guidance start/end a number or one per ControlNet (0 <= start < end <= 1). ``load_image(image)`` gives the
    (N, 3, H, W) rows of one ControlNet's image(s)."""
    recs = select(manifest, controlnet)
    names = [r["name"] for r in recs]
    if len(recs) == 1:
        images = [control_image]
    elif not isinstance(control_image, (list, tuple)) or len(control_image) != len(recs):
        given = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise GenerationError(f"{given} control image(s) for {len(recs)} ControlNets ({', '.join(names)}); give a list "
                              "with one image per ControlNet, or choose one with controlnet=NAME")
    else:
        images = list(control_image)
    if isinstance(scale, (list, tuple)) and len(recs) == 1 and len(scale) >= 1:
        scale = scale[0]  # diffusers: a single ControlNet takes the list's first
    scales = _per_net(scale, len(recs), "controlnet_conditioning_scale", names)
    if isinstance(start, (list, tuple)) != isinstance(end, (list, tuple)):  # one given per net: the other too
        start = [start] * len(end) if isinstance(end, (list, tuple)) else start
        end = [end] * len(start) if isinstance(start, (list, tuple)) else end
    starts = _per_net(start, len(recs), "control_guidance_start", names)
    ends = _per_net(end, len(recs), "control_guidance_end", names)
    for s, e in zip(starts, ends):
        if s >= e:
            raise GenerationError(f"control_guidance_start {s} must be below control_guidance_end {e}")
        if s < 0.0:
            raise GenerationError(f"control_guidance_start {s} must be 0 or more")
        if e > 1.0:
            raise GenerationError(f"control_guidance_end {e} must be 1 or less")
    out = []
    for rec, image, sc, s, e in zip(recs, images, scales, starts, ends):
        rows = _stack([load_image(im) for im in image] if isinstance(image, (list, tuple)) else [load_image(image)])
        want = rec.get("conditioning_channels", 3)
        if rows.shape[1] != want:
            raise GenerationError(f"the ControlNet {rec['name']} takes {want}-channel control images, got {rows.shape[1]}")
        out.append(Control(rec, rows, sc, s, e))
    return out


def default_size(manifest: dict, control_image, controlnet) -> tuple[int, int]:
    """(height, width) of the first control image, rounded down to a multiple of the VAE scale factor: the size a
    text-to-image call without height/width makes, as diffusers' ControlNet pipelines (get_default_height_width)."""
    from .images import open_image

    first = control_image
    if len(select(manifest, controlnet)) > 1 and isinstance(first, (list, tuple)) and first:
        first = first[0]  # the first ControlNet's entry
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    first = open_image(first, "control image")
    if isinstance(first, np.ndarray) and first.ndim in (3, 4):
        h, w = first.shape[-3], first.shape[-2]
    elif hasattr(first, "size") and not isinstance(first, np.ndarray):
        w, h = first.size
    else:
        raise GenerationError(f"control_image must be a path, a PIL image or a numpy array (H, W, 3), got "
                              f"{type(first).__name__}")
    f = manifest["vae_scale_factor"]
    return int(h) - int(h) % f, int(w) - int(w) % f


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    if len({r.shape for r in rows}) > 1:
        raise GenerationError("the control images of one ControlNet must all be the same size")
    return np.concatenate(rows)


def controlnet_callable(engine, record: dict, conditioning: list[np.ndarray], image: np.ndarray,
                        control: dict, times: list | None = None) -> Callable[[np.ndarray, float], dict]:
    """A ControlNet engine as ``(x, t) -> {residual name: array}``. Inputs are bound as the UNet's are
    (loop.unet_callable): sample, timestep, then ``conditioning`` in the record's order; ``image`` (the
    batch's rows) goes to the input the ControlNet's manifest entry ``control`` names. ``times`` collects the
    seconds of each call."""
    import time

    names = [t["name"] for t in record["inputs"]]
    sample, timestep = names[0], names[1]
    t_spec = record["inputs"][1]
    t_dtype, t_scalar = np.dtype(t_spec.get("dtype", "float32")), len(t_spec["shape"]) == 0
    cond_name = control["conditioning_input"]
    bound = [n for n in names[2:] if n != cond_name]
    rest = {n: np.asarray(c).astype(spec["dtype"], copy=False)
            for n, c, spec in zip(bound, conditioning, [s for s in record["inputs"][2:] if s["name"] != cond_name])}
    rest[cond_name] = np.ascontiguousarray(image, dtype=np.float32)
    outs = [r["name"] for r in control["residuals"]]

    def run(x, t):
        t0 = time.perf_counter()
        ts = np.asarray(t, t_dtype) if t_scalar else np.full((len(x),), t, t_dtype)
        y = engine(**{sample: x, timestep: ts}, **rest)
        if times is not None:
            times.append(time.perf_counter() - t0)
        return {n: y[n] for n in outs}

    return run


def residual_zeros(control: dict, x: np.ndarray) -> dict:
    """Zero residuals for latents ``x`` (steps where no ControlNet acts): shapes from the record, whose
    spatial sizes are ``latent_height`` or ``latent_height/k`` (the UNet's stride-2 downsamplings: ceil)."""
    h, w = x.shape[-2:]
    sizes = {"batch": len(x), "latent_height": h, "latent_width": w}
    return {r["name"]: np.zeros([dim_size(d, sizes) for d in r["shape"]], np.float32) for r in control["residuals"]}


def dim_size(d, sizes: dict) -> int:
    """A recorded dimension's size: an int as is, a name from ``sizes``, ``name/k`` that size divided by k,
    rounded up (a feature map after stride-2 downsamplings)."""
    if isinstance(d, int):
        return d
    base, _, k = d.partition("/")
    return -(-sizes[base] // int(k)) if k else sizes[base]


def unet_component(manifest: dict, controls) -> str:
    """The UNet graph a call runs: the one taking ControlNet residuals when the call has ControlNets."""
    return manifest.get("controlnet_unet", CONTROLNET_UNET) if controls else "unet"


def with_controls(pipe, req, model, conditioning: list[np.ndarray], start: int = 0):
    """``model`` (the residual-taking UNet, its extra channels bound) wrapped in loop.with_controlnet with the
    request's ControlNets: each engine bound to the UNet's conditioning and its control image (doubled under
    guidance, as diffusers' prepare_image), its scale per step ``scale * controlnet_keep``, with the keep over the
    steps from ``start`` to the end of the schedule (diffusers' controlnet_keep over the timesteps it runs)."""
    from .loop import with_controlnet

    n = len(req.scheduler.timesteps) - start
    nets = []
    for c in req.controls:
        image = np.concatenate([c.image] * 2) if req.cfg else c.image
        comp = c.record["component"]
        nets.append(controlnet_callable(pipe.engine(comp), pipe.manifest["components"][comp], conditioning, image,
                                        c.record, req.timings.controlnet))
    scales = ([c.scale * c.keep(i, n) for c in req.controls] for i in range(n))
    return with_controlnet(model, nets, scales, lambda x: residual_zeros(req.controls[0].record, x))


__all__ = ["CONTROLNET_UNET", "Control", "component_name", "controls", "default_size", "dim_size", "controlnet_callable", "is_controlnet",
           "records", "residual_zeros", "select", "unet_component", "with_controls"]
