"""The Stable Diffusion pipeline: a loaded model directory, and ``pipe(prompt, ...)`` with diffusers'
argument names and meanings. ``__call__`` checks the arguments, picks the task from them
(text to image, image to image, inpainting: tasks.py), runs it and decodes.

    pipe = Pipeline.load("engines/sd1")
    pipe("a red circle", image="photo.png", mask_image="mask.png").images[0].save("out.png")
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import select
from .errors import GenerationError, ModelDirError, NonFiniteError  # noqa: F401  (re-exported)
from .families import family_for
from .controlnet import controls as make_controls, default_size as controlnet_size, records as controlnet_records
from .images import load_image, load_mask, open_image
from .lora import LoraMixin
from .manifest import load_manifest
from .optimum import imported_dir, is_optimum_dir
from .prompts import syntax_name as prompt_syntax_name
from .schedulers import make_scheduler
from .stages import Request, Timings, decode, latent_shape, per_image
from .tasks import TASK_NAMES, pick_task
from .tokenizer import ClipTokenizer
from .vae import Vae

OUTPUT_TYPES = ("pil", "np", "latent")
DEFAULT_STEPS = 50  # diffusers' default, when the model records none


@dataclass
class PipelineOutput:
    images: list | np.ndarray  # PIL images; float32 (B, H, W, 3) in [0, 1] for "np"; latents for "latent"
    timings: Timings
    parameters: dict


class Pipeline(LoraMixin):
    """A loaded model directory, ready to generate.

    ``Pipeline.load(path, backend="auto")``; then ``pipe(prompt, ...)`` as diffusers' pipelines.
    """

    def __init__(self, model_dir: Path, manifest: dict, backend: str, engines: dict, tokenizers: list,
                 low_memory: bool = False):
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        self.low_memory = low_memory
        self.engines = engines
        self.tokenizers = tokenizers
        self.family = family_for(manifest)
        self.name = model_dir.name  # what a result's parameters call the model (the folder's name)
        self.scheduler_config = _read_scheduler_config(model_dir)
        # the model's own sampling settings, when its export recorded them (checked by load_manifest)
        self.generation_defaults: dict = dict(manifest.get("generation_defaults") or {})
        self.vae = Vae.from_manifest(manifest)
        self.vae_tiling = False
        self.precision = "fp32"

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", *, threads: int | None = None,
             low_memory: bool = False, cuda_graph: bool = False, precision: str = "fp32") -> "Pipeline":
        """``precision``: "fp32" (the default, the parity path), "bf16" (OpenVINO, on CPUs with AVX-512 BF16
        or AMX) or "int8" (the UNet graph `sdrt quantize` wrote); see runtime/precision.py.
        ``low_memory``: each component is loaded when needed and released after its stage, so
        peak memory is the largest component's rather than the sum (slower: every call reloads).
        ``cuda_graph`` (TensorRT backend): capture the UNet call once and replay it every step."""
        model_dir = name = Path(path)
        if is_optimum_dir(model_dir):  # optimum's ONNX layout: a derived manifest, kept in the user's cache
            model_dir = imported_dir(model_dir)
        manifest = load_manifest(model_dir)
        kind, engines = select(backend, model_dir, manifest, threads=threads, low_memory=low_memory,
                               cuda_graph=cuda_graph, precision=precision)
        tokenizers = [ClipTokenizer.from_manifest(model_dir, rec) for rec in manifest["tokenizers"]]
        pipe = cls(model_dir, manifest, kind, engines, tokenizers, low_memory=low_memory)
        pipe.name = name.absolute().name
        pipe.precision = precision
        return pipe

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles, blended as diffusers' ``pipe.vae.enable_tiling()`` does:
        memory stays that of one tile whatever the image size (runtime/vae.py)."""
        self.vae_tiling = True

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = False

    def engine(self, name: str):
        return self.engines[name]

    def done_with(self, *names: str) -> None:
        """Release components after their stage when loaded with ``low_memory``."""
        if self.low_memory:
            for name in names:
                if name in self.engines:
                    self.engines[name].close()

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        image=None,
        mask_image=None,
        strength: float | None = None,
        scheduler_config: dict | None = None,
        output_type: str = "pil",
        generator: np.random.Generator | None = None,
        callback=None,
        *,
        prompt_syntax: str | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        control_image=None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        controlnet: str | Sequence[str] | None = None,
    ) -> PipelineOutput:
        """Generate images. ``seed`` makes a numpy Generator (``generator`` passes one directly);
        ``latents`` gives the initial noise (B, C, H/8, W/8) as in diffusers. ``image`` alone runs image to
        image, ``image`` with ``mask_image`` inpainting (white, >= 0.5, is repainted; black kept); each a
        path, PIL image or numpy array. ``strength`` (default 0.8 for image to image, 1.0 for inpainting)
        is how much of the schedule runs. ``callback(step, num_steps)`` is called after each step.
        ``num_inference_steps`` and ``guidance_scale`` default to the model's ``generation_defaults``
        (``sdrt export --default-steps/--default-guidance``), else to diffusers' 50 and the family's
        guidance (7.5; 5.0 for SDXL). ``output_type``: "pil", "np" or "latent".

        ``prompt_syntax``: None (diffusers': 77 tokens, truncated, no weighting), "compel" (compel's
        weighting syntax, long prompts in 77-token chunks, as compel's CompelForSD/CompelForSDXL give
        diffusers) or "a1111" (AUTOMATIC1111's); see sdrt.runtime.prompts. ``prompt_embeds`` (B, L, D),
        ``negative_prompt_embeds`` and, for SDXL, ``pooled_prompt_embeds`` (B, P) and
        ``negative_pooled_prompt_embeds`` take precomputed conditioning instead of text, as diffusers does.

        The SDXL base -> refiner hand-off, as diffusers': ``denoising_end`` (in (0, 1)) stops the schedule at that
        fraction, and with ``output_type="latent"`` ``.images`` holds the latents (B, C, H/8, W/8); the refiner,
        given them as ``image`` with ``denoising_start`` (the same fraction), runs the rest (strength ignored).
        ``aesthetic_score`` / ``negative_aesthetic_score`` condition a refiner's positive / negative rows.

        ControlNet, as diffusers' StableDiffusion[XL]ControlNet{,Img2Img,Inpaint}Pipeline (for each task):
        ``control_image`` conditions the ControlNets exported beside the model (``sdrt export --controlnet``).
        ``controlnet`` picks them: None uses every one, in export order (``pipe.controlnets`` lists them), a name or
        a list of names those. With one ControlNet, ``control_image`` is an image (path, PIL, numpy (H, W, 3) in
        [0, 1]) or a list of them (one per prompt); with several, a list of one such entry per ControlNet. Their
        residuals are scaled by ``controlnet_conditioning_scale`` (a number or one per ControlNet) and summed; each
        acts from ``control_guidance_start`` to ``control_guidance_end`` (fractions of the steps; a number or one per
        ControlNet). Text to image without height/width takes the first control image's size (rounded down to a
        multiple of 8), as diffusers does."""
        t_start = time.perf_counter()
        if control_image is None and controlnet is not None:
            raise GenerationError("controlnet was given without control_image; give the image(s) to condition on")
        if control_image is not None and image is None and (height is None or width is None):
            h, w = controlnet_size(self.manifest, control_image, controlnet)
            height, width = height or h, width or w
        task = pick_task(self.manifest, image, mask_image, refines=self.family.refines)
        if strength is None:
            strength = 1.0 if mask_image is not None else 0.8
        req = self._request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                            num_images_per_prompt, seed, latents, scheduler, image, mask_image, strength,
                            scheduler_config, output_type, generator, callback, prompt_syntax=prompt_syntax,
                            embeds=(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                    negative_pooled_prompt_embeds),
                            hand_off=dict(denoising_start=denoising_start, denoising_end=denoising_end,
                                          aesthetic_score=aesthetic_score,
                                          negative_aesthetic_score=negative_aesthetic_score))
        if control_image is not None:
            req.controls = self._controls(req, control_image, controlnet_conditioning_scale, control_guidance_start,
                                          control_guidance_end, controlnet)
        latents = task(self, req)
        images = latents if output_type == "latent" else decode(self, latents, req)
        req.timings.total = time.perf_counter() - t_start
        params = self._params(req, task, negative_prompt, seed, scheduler_config, strength if image is not None else None,
                              prompt_embeds, negative_prompt_embeds, denoising_start, denoising_end)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]
        return PipelineOutput(images, req.timings, params)

    def _params(self, req, task, negative_prompt, seed, scheduler_config, strength, prompt_embeds,
                negative_prompt_embeds, denoising_start, denoising_end) -> dict:
        """What an image was made with, as PipelineOutput.params records it (the infotext, the server's info)."""
        return {
            "prompt": req.prompts if req.prompts is None or len(req.prompts) > 1 else req.prompts[0],
            "negative_prompt": negative_prompt,
            **({"prompt_syntax": req.prompt_syntax} if req.prompt_syntax != "none" else {}),
            **{name: list(np.shape(x)) for name, x in (("prompt_embeds", prompt_embeds),
                                                       ("negative_prompt_embeds", negative_prompt_embeds)) if x is not None},
            "num_inference_steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "height": req.height,
            "width": req.width,
            "seed": seed,
            "scheduler": req.scheduler.name,
            "scheduler_config": scheduler_config,
            "strength": strength if denoising_start is None else None,
            **{k: v for k, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)) if v is not None},
            **({"aesthetic_score": req.aesthetic_score, "negative_aesthetic_score": req.negative_aesthetic_score}
               if self.family.refines else {}),
            "task": TASK_NAMES[task],
            **({"controlnets": [{"name": c.name, "scale": c.scale, "start": c.start, "end": c.end} for c in req.controls]}
               if req.controls else {}),
            "model": self.name,
            "backend": self.backend,
            **({"precision": self.precision} if self.precision != "fp32" else {}),
            **({"vae_tiling": True} if self.vae_tiling else {}),
        }

    def _request(self, prompt, negative_prompt, steps, guidance_scale, height, width, per_prompt, seed, latents,
                 scheduler, image, mask_image, strength, scheduler_config, output_type, generator, callback, *,
                 prompt_syntax=None, embeds=(None, None, None, None), hand_off=None) -> Request:
        """The call's arguments checked and filled with defaults; every error names the argument."""
        m, defaults = self.manifest, self.generation_defaults
        syntax = prompt_syntax_name(prompt_syntax)
        prompts, prompt_embeds, negative_embeds = self._prompt_inputs(prompt, negative_prompt, *embeds)
        n_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
        hand_off = _hand_off(m, image, mask_image, height, width, **(hand_off or {}))
        if hand_off["image_latents"] is not None:
            height, width = hand_off.pop("size")  # the latents' own
            image = None  # read: nothing to load below
        height = m["native_resolution"] if height is None else height
        width = m["native_resolution"] if width is None else width
        if guidance_scale is None:
            guidance_scale = defaults.get("guidance_scale", self.family.default_guidance)
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError):
            raise GenerationError(f"guidance_scale must be a number, got {guidance_scale!r}") from None
        if not math.isfinite(guidance_scale):
            raise GenerationError(f"guidance_scale must be finite, got {guidance_scale!r}")
        steps = defaults.get("num_inference_steps", DEFAULT_STEPS) if steps is None else steps
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise GenerationError(f"{name} must be a positive integer, got {v!r}")
            if v % 8:
                raise GenerationError(f"{name} {v} is not a multiple of 8; use {_nearest_multiples(v)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise GenerationError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise GenerationError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}")
        if (image is not None or hand_off["image_latents"] is not None) and (isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating))
                                  or not 0.0 < strength <= 1.0):
            raise GenerationError(f"strength must be in (0, 1] (a number), got {strength!r}")
        if output_type not in OUTPUT_TYPES:
            raise GenerationError(f"output_type must be 'pil' or 'np' (or 'latent' for the latents themselves), got {output_type!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and n_prompts > 1:
                negatives = negatives * n_prompts
            if len(negatives) != n_prompts:
                raise GenerationError(
                    f"{len(negatives)} negative prompts for {n_prompts} prompts; give one negative prompt, or one per prompt"
                )
        try:
            sched = make_scheduler(scheduler, self.scheduler_config, scheduler_config)
            sched.set_timesteps(steps)
        except ValueError as e:
            raise GenerationError(str(e)) from e
        req = Request(prompts, negatives, per_prompt, steps, float(guidance_scale), height, width, sched,
                      generator if generator is not None else np.random.default_rng(seed),
                      strength=strength, callback=callback, prompt_syntax=syntax, prompt_embeds=prompt_embeds,
                      negative_embeds=negative_embeds, **hand_off)
        image = open_image(image) if image is not None else None  # read once: the mask is checked against it
        if mask_image is not None:
            req.mask = load_mask(mask_image, height, width, image=image)
        if image is not None:
            req.image = load_image(image, height, width)
        if req.mask is not None and len(req.mask) not in (1, len(req.image)) and len(req.image) != 1:
            raise GenerationError(f"{len(req.mask)} mask images for {len(req.image)} images; give one mask, or one per image")
        if latents is not None:
            shape = latent_shape(self, req)
            req.latents = np.asarray(latents, dtype=np.float32)
            if req.latents.shape != shape:
                raise GenerationError(f"latents have shape {req.latents.shape}, expected {shape} for this batch and size")
        return req

    @property
    def controlnets(self) -> list[str]:
        """The names of the ControlNets exported beside the model, in export order."""
        return [r["name"] for r in controlnet_records(self.manifest)]

    def _controls(self, req, control_image, scale, start, end, controlnet) -> list:
        """The call's ControlNets (runtime/controlnet.py), their images one row per image of the batch."""
        from dataclasses import replace

        unet = self.manifest["components"].get(self.manifest.get("controlnet_unet"), {})
        if self.get_active_adapters() and not unet.get("weights"):
            raise GenerationError("this model's ControlNet UNet was exported without a weight map, so a LoRA cannot apply "
                                  "to it; re-export the model with this sdrt, or unload the LoRA for this call")
        load = lambda im: load_image(im, req.height, req.width, "control image", normalize=False)  # noqa: E731
        controls = make_controls(self.manifest, control_image, scale, start, end, controlnet, load)
        return [replace(c, image=per_image(c.image, req, "control image")) for c in controls]

    def _prompt_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled):
        """(prompts, prompt embeddings, negative embeddings): text or diffusers' embeddings, one of the two,
        checked as diffusers' check_inputs does."""
        for text, embeds, names in ((prompt, prompt_embeds, ("prompt", "prompt_embeds")),
                                    (negative_prompt, negative_prompt_embeds, ("negative_prompt", "negative_prompt_embeds"))):
            if text is not None and embeds is not None:
                raise GenerationError(f"both {names[0]} and {names[1]} were given; give one of them")
        for pooled_x, embeds, names in ((pooled, prompt_embeds, ("pooled_prompt_embeds", "prompt_embeds")),
                                        (negative_pooled, negative_prompt_embeds,
                                         ("negative_pooled_prompt_embeds", "negative_prompt_embeds"))):
            if pooled_x is not None and embeds is None:
                raise GenerationError(f"{names[0]} was given without {names[1]}; give both")
        if prompt is None and prompt_embeds is None:
            raise GenerationError("give a prompt (or prompt_embeds)")
        positive = negative = None
        if prompt_embeds is not None:
            positive = self.family.embeds_conditioning(self.manifest, prompt_embeds, pooled,
                                                       ("prompt_embeds", "pooled_prompt_embeds"))
        if negative_prompt_embeds is not None:
            negative = self.family.embeds_conditioning(self.manifest, negative_prompt_embeds, negative_pooled,
                                                       ("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
            if positive is not None and negative.hidden.shape != positive.hidden.shape:
                raise GenerationError(f"negative_prompt_embeds has shape {negative.hidden.shape}, expected "
                                      f"{positive.hidden.shape}, the shape of prompt_embeds")
        prompts = _as_list(prompt, "prompt") if prompt is not None else None
        n = len(prompts) if prompts is not None else len(positive)
        if negative is not None and len(negative) != n:
            raise GenerationError(f"negative_prompt_embeds has {len(negative)} rows for {n} prompts; give one row per prompt")
        return prompts, positive, negative

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def _hand_off(manifest: dict, image, mask_image, height, width, denoising_start=None, denoising_end=None,
              aesthetic_score=6.0, negative_aesthetic_score=2.5) -> dict:
    """The base -> refiner hand-off's arguments checked, as Request fields (+ "size": the latents' in pixels):
    ``image`` given as latents (a numpy (N, C, h, w) array of the model's latent channels), the denoising
    fractions, the aesthetic scores."""
    fractions = {}
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 < v < 1.0):
            raise GenerationError(f"{name} must be a number in (0, 1), the fraction of the schedule, got {v!r}")
        fractions[name] = None if v is None else float(v)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise GenerationError(f"denoising_start {denoising_start} must be below denoising_end {denoising_end}")
    if (denoising_start is not None or denoising_end is not None) and mask_image is not None:
        raise GenerationError("denoising_start/denoising_end are for text to image and image to image (the SDXL base -> "
                              "refiner hand-off), not inpainting")
    if denoising_start is not None and image is None:
        raise GenerationError("denoising_start continues a denoising run: give image= (the base's latents from "
                              "output_type='latent' with denoising_end, or a picture)")
    for name, v in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
            raise GenerationError(f"{name} must be a finite number, got {v!r}")
    out = dict(fractions, aesthetic_score=float(aesthetic_score), negative_aesthetic_score=float(negative_aesthetic_score),
               image_latents=None)
    z = manifest["latent_channels"]
    if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == z and z != 3:
        f = manifest["vae_scale_factor"]
        size = (image.shape[2] * f, image.shape[3] * f)
        for name, given, v in (("height", height, size[0]), ("width", width, size[1])):
            if given is not None and given != v:
                raise GenerationError(f"{name} {given} does not match the latents given as image ({v} pixels); leave it out")
        if not np.isfinite(image).all():
            raise GenerationError("the latents given as image hold NaN or Inf")
        out.update(image_latents=image.astype(np.float32), size=size)
    return out


def _nearest_multiples(v: int, m: int = 8) -> str:
    lo = max(m, v // m * m)
    hi = lo + m if lo < v else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def _as_list(x, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x) and x:
        return list(x)
    raise GenerationError(f"{name} must be a string or a non-empty list of strings, got {type(x).__name__}")


def _read_scheduler_config(model_dir: Path) -> dict:
    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["GenerationError", "NonFiniteError", "Pipeline", "PipelineOutput", "Timings"]
