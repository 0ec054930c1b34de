"""The model families sdrt exports, one descriptor each: everything that differs between them on the
export side, so that no other export module asks which family it holds.

A family names the diffusers pipelines (model_index ``_class_name``) it covers and for which task,
tells itself apart from a family with the same pipeline classes, names the diffusers class that
loads it, lists the folders of its checkpoint, describes the components it exports (names, dynamic
dimensions, sample inputs side by side, as TensorRT's demo/Diffusion does) and the facts its
manifest records. The runtime mirrors this in ``sdrt.runtime.families``, reading the manifest.

torch is imported only where components are built: detecting a family reads config files alone.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.manifest import INPAINTING, TEXT_TO_IMAGE

from .checkpoint import Checkpoint, CheckpointError
from .controlnet import controlnet_facts


# Pipelines of other architectures, named so the error can say what the checkpoint is.
UNSUPPORTED_PIPELINES = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
    "StableCascadeCombinedPipeline": "Stable Cascade",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableDiffusionXLRefinerPipeline": "SDXL refiner",
    "StableDiffusionUpscalePipeline": "SD x4 upscaler",
    "IFPipeline": "DeepFloyd IF",
    "SanaPipeline": "Sana",
    "AuraFlowPipeline": "AuraFlow",
}


def unet_task(in_channels: int, latent_channels: int, where) -> str:
    """The task a UNet was trained for, from its input channels: the latents alone (text to image),
    or latents + mask + masked-image latents (diffusers' inpainting UNets: 4 + 1 + 4 = 9)."""
    if in_channels == latent_channels:
        return TEXT_TO_IMAGE
    if in_channels == 2 * latent_channels + 1:
        return INPAINTING
    z = latent_channels
    raise CheckpointError(
        f"{where}: the UNet has {in_channels} input channels and the VAE {z} latent channels; sdrt supports "
        f"{z} (text to image) and {2 * z + 1} (inpainting: {z} latents + 1 mask + {z} masked-image latents)"
    )


class StableDiffusion:
    """Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden state (after the final
    layer norm) conditions the UNet alone. The two differ only in the text tower: 2.x's OpenCLIP
    (gelu, 1024 wide) against 1.x's OpenAI CLIP (quick_gelu, 768)."""

    pipelines = {
        TEXT_TO_IMAGE: ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        INPAINTING: ("StableDiffusionInpaintPipeline",),
    }
    loaders = {TEXT_TO_IMAGE: "StableDiffusionPipeline", INPAINTING: "StableDiffusionInpaintPipeline"}
    checkpoint_folders = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
    takes_controlnet = True  # diffusers' StableDiffusion[XL]ControlNet*Pipeline run this family with ControlNets

    def __init__(self, name: str, title: str, openclip: bool):
        self.name, self.title, self.openclip = name, title, openclip

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- detection and loading ------------------------------------------------------------

    def loader_for(self, pipeline_class: str) -> str | None:
        """The diffusers pipeline class that loads a checkpoint whose model_index names
        ``pipeline_class``, or None when this family does not cover it."""
        for task, classes in self.pipelines.items():
            if pipeline_class in classes:
                return self.loaders[task]
        return None

    def claims(self, model_index: dict, text_encoder_config: dict) -> bool:
        """Whether a checkpoint of a pipeline class this family covers is of this family."""
        te = text_encoder_config
        return (te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024) == self.openclip

    def check_index(self, model_index: dict, root: Path) -> None:
        """Refuse, before anything is loaded, a checkpoint of this family's pipelines that sdrt cannot export."""

    def modules(self, pipe) -> dict:
        """The Checkpoint fields taken from a loaded diffusers pipeline (torch modules in fp32, eval mode)."""
        return dict(
            text_encoder=pipe.text_encoder.float().eval(),
            unet=pipe.unet.float().eval(),
            vae=pipe.vae.float().eval(),
            tokenizer=pipe.tokenizer,
        )

    # -- components -----------------------------------------------------------------------

    def components(self, ckpt: Checkpoint, max_length: int = 77) -> list:
        """Descriptors of every component to export, in export order."""
        import torch

        encoders = [te for te in (ckpt.text_encoder, ckpt.text_encoder_2) if te is not None]
        # token ids valid for every text encoder (a trimmed vocabulary, like the default model's, is smaller)
        vocab = min(te.config.vocab_size for te in encoders)

        def ids(b, h, w):
            # a mask with zeros, so that the trace keeps the masking (an all-ones one would be traced away)
            mask = torch.ones(b, max_length, dtype=torch.int32)
            mask[:, max_length // 2 : max_length // 2 + 3] = 0
            return torch.randint(0, vocab, (b, max_length), dtype=torch.int32), mask

        text = self.text_encoder_components(ckpt, max_length, ids)
        ctx_dim = sum(c.outputs[0].shape[-1] for c in text)  # hidden states concatenated on features
        from .controlnet import controlnet_components

        return (text + [self.unet_component(ckpt, max_length, ctx_dim)] + vae_components(ckpt)
                + controlnet_components(self, ckpt, max_length, ctx_dim))

    def text_encoder_components(self, ckpt: Checkpoint, L: int, ids) -> list:
        from .components import BATCH, TensorSpec, TextEncoderOutputs, text_encoder_component

        d = ckpt.text_encoder.config.hidden_size
        return [text_encoder_component("text_encoder", TextEncoderOutputs(ckpt.text_encoder, "last"),
                                       [TensorSpec("last_hidden_state", "float32", [BATCH, L, d])], ids, L)]

    def unet_added_inputs(self, unet) -> list:
        """The UNet's conditioning inputs beyond sample, timestep and encoder_hidden_states
        (its ``added_cond_kwargs``), in input order."""
        return []

    def unet_added_sample(self, unet, b: int, h: int, w: int) -> tuple:
        """Sample tensors for :meth:`unet_added_inputs` at batch ``b`` and latent size ``h`` x ``w``."""
        return ()

    def unet_component(self, ckpt: Checkpoint, L: int, ctx_dim: int):
        import torch

        from .components import BATCH, LAT_H, LAT_W, TEXT_LEN, Component, TensorSpec, UNetNoisePrediction

        unet = ckpt.unet
        c_in, c_out = unet.config.in_channels, unet.config.out_channels  # c_in 9 for inpainting UNets
        lat = unet.config.sample_size
        f = 2 ** (len(unet.config.block_out_channels) - 1)  # latent sizes must divide by it for a clean trace
        small = max(f, (lat // 2) // f * f)
        added = self.unet_added_inputs(unet)

        def sample(b, h, w):
            chunks = 1 if b > 1 else 2  # the single-image validation shape runs a two-chunk (2 x 77) text
            return (
                torch.randn(b, c_in, h, w),
                torch.full((b,), 500.0) + torch.arange(b, dtype=torch.float32) * 37,
                torch.randn(b, L * chunks, ctx_dim),
            ) + self.unet_added_sample(unet, b, h, w)

        return Component(
            "unet",
            UNetNoisePrediction(unet, [t.name for t in added]),
            [
                TensorSpec("sample", "float32", [BATCH, c_in, LAT_H, LAT_W]),
                TensorSpec("timestep", "float32", [BATCH]),
                TensorSpec("encoder_hidden_states", "float32", [BATCH, TEXT_LEN, ctx_dim]),
            ] + added,
            [TensorSpec("out_sample", "float32", [BATCH, c_out, LAT_H, LAT_W])],
            sample,
            [(2, lat, lat), (1, small, max(f, (lat * 3 // 4) // f * f))],
            trace_at=(2, small, small),
        )

    # -- the manifest ---------------------------------------------------------------------

    def manifest_facts(self, ckpt: Checkpoint) -> dict:
        vae, unet = ckpt.vae.config, ckpt.unet.config
        vae_scale = 2 ** (len(vae.block_out_channels) - 1)
        return {
            "family": self.name,
            "task": ckpt.task,
            "prediction_type": ckpt.scheduler_config.get("prediction_type", "epsilon"),
            "latent_channels": int(vae.latent_channels),
            "unet_in_channels": int(unet.in_channels),
            "vae_scale_factor": vae_scale,
            "vae_scaling_factor": float(vae.scaling_factor),
            "vae_shift_factor": float(vae.shift_factor) if getattr(vae, "shift_factor", None) is not None else None,
            # Latents are divided by the scaling factor (and shifted) by the runtime, outside the decoder graph.
            "vae_scaling": "runtime",
            "native_resolution": int(unet.sample_size) * vae_scale,
            "scheduler_class": ckpt.scheduler_config.get("_class_name"),
            "vae": vae_facts(ckpt.vae, ckpt.vae_source),
            **controlnet_facts(ckpt),
        }


class StableDiffusionXL(StableDiffusion):
    """SDXL base: two text encoders, the penultimate hidden states of both concatenated, and from the
    second the projected pooled embedding, which the UNet takes with six time ids (original size,
    crop, target size) as its text_time conditioning (diffusers' StableDiffusionXLPipeline.encode_prompt
    with clip_skip=None, and _get_add_time_ids)."""

    pipelines = {
        TEXT_TO_IMAGE: ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
        INPAINTING: ("StableDiffusionXLInpaintPipeline",),
    }
    loaders = {TEXT_TO_IMAGE: "StableDiffusionXLPipeline", INPAINTING: "StableDiffusionXLInpaintPipeline"}
    checkpoint_folders = StableDiffusion.checkpoint_folders + ("text_encoder_2", "tokenizer_2")
    TIME_IDS = 6

    def __init__(self):
        super().__init__("sdxl", "Stable Diffusion XL base", openclip=False)

    def claims(self, model_index: dict, text_encoder_config: dict) -> bool:
        return not is_refiner(model_index)

    def modules(self, pipe) -> dict:
        return dict(
            super().modules(pipe),
            text_encoder_2=pipe.text_encoder_2.float().eval(),
            tokenizer_2=pipe.tokenizer_2,
            extras={"force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True))},
        )

    def text_encoder_components(self, ckpt: Checkpoint, L: int, ids) -> list:
        return [self._text_encoder(ckpt, L, ids), self._text_encoder_2(ckpt, L, ids)]

    @staticmethod
    def _text_encoder(ckpt: Checkpoint, L: int, ids):
        from .components import BATCH, TensorSpec, TextEncoderOutputs, hidden_state_outputs, text_encoder_component

        te = ckpt.text_encoder
        d, n = te.config.hidden_size, te.config.num_hidden_layers
        # every layer's hidden states, named as optimum names them; the UNet gets the penultimate layer's
        states = hidden_state_outputs(n, L, d)
        return text_encoder_component("text_encoder", TextEncoderOutputs(te, "hidden_states"), [states[n - 1]], ids, L,
                                      graph_outputs=[TensorSpec("last_hidden_state", "float32", [BATCH, L, d]),
                                                     TensorSpec("pooler_output", "float32", [BATCH, d]), *states])

    @staticmethod
    def _text_encoder_2(ckpt: Checkpoint, L: int, ids):
        from .components import BATCH, TensorSpec, TextEncoderOutputs, hidden_state_outputs, text_encoder_component

        te = ckpt.text_encoder_2
        d, n, proj = te.config.hidden_size, te.config.num_hidden_layers, te.config.projection_dim
        states = hidden_state_outputs(n, L, d)
        pooled = TensorSpec("text_embeds", "float32", [BATCH, proj])
        return text_encoder_component("text_encoder_2", TextEncoderOutputs(te, "pooled+hidden_states"),
                                      [states[n - 1], pooled], ids, L,
                                      graph_outputs=[pooled, TensorSpec("last_hidden_state", "float32", [BATCH, L, d]),
                                                     *states])

    def _pooled_dim(self, unet) -> int:
        return unet.config.projection_class_embeddings_input_dim - self.TIME_IDS * unet.config.addition_time_embed_dim

    def unet_added_inputs(self, unet) -> list:
        from .components import BATCH, TensorSpec

        return [
            TensorSpec("text_embeds", "float32", [BATCH, self._pooled_dim(unet)]),
            TensorSpec("time_ids", "float32", [BATCH, self.TIME_IDS]),
        ]

    def unet_added_sample(self, unet, b: int, h: int, w: int) -> tuple:
        import torch

        return torch.randn(b, self._pooled_dim(unet)), torch.tensor([self.time_ids(h * 8.0, w * 8.0)] * b)

    def time_ids(self, height: float, width: float) -> list[float]:
        """(original size, crop top-left, target size) in pixels, as _get_add_time_ids builds them."""
        return [height, width, 0.0, 0.0, height, width]

    def manifest_facts(self, ckpt: Checkpoint) -> dict:
        return dict(
            super().manifest_facts(ckpt),
            force_zeros_for_empty_prompt=ckpt.extras.get("force_zeros_for_empty_prompt", True),
            addition_time_embed_dim=ckpt.unet.config.addition_time_embed_dim,
        )


def is_refiner(model_index: dict) -> bool:
    """An SDXL refiner's model_index: no first text encoder, and an aesthetic score in the UNet's time ids."""
    return bool(model_index.get("requires_aesthetics_score")) or model_index.get("text_encoder") in (None, [None, None])


class StableDiffusionXLRefiner(StableDiffusionXL):
    """The SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0): an image-to-image model with the
    second text encoder alone (its penultimate hidden states and projected pooled embedding) and five time
    ids, the aesthetic score in place of the target size (diffusers' StableDiffusionXLImg2ImgPipeline with
    requires_aesthetics_score)."""

    pipelines = {TEXT_TO_IMAGE: ("StableDiffusionXLImg2ImgPipeline",)}
    loaders = {TEXT_TO_IMAGE: "StableDiffusionXLImg2ImgPipeline"}
    checkpoint_folders = ("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler")
    TIME_IDS = 5
    takes_controlnet = False

    def __init__(self):
        StableDiffusion.__init__(self, "sdxl-refiner", "Stable Diffusion XL refiner", openclip=False)

    def claims(self, model_index: dict, text_encoder_config: dict) -> bool:
        return is_refiner(model_index)

    def check_index(self, model_index: dict, root: Path) -> None:
        if not model_index.get("requires_aesthetics_score") or model_index.get("text_encoder") not in (None, [None, None]):
            raise CheckpointError(f"{root} has no text_encoder but no requires_aesthetics_score (or the reverse): not an "
                                  f"SDXL base nor a refiner as diffusers writes them; sdrt supports {supported()}")

    def modules(self, pipe) -> dict:
        return dict(
            text_encoder=None,
            tokenizer=None,
            unet=pipe.unet.float().eval(),
            vae=pipe.vae.float().eval(),
            text_encoder_2=pipe.text_encoder_2.float().eval(),
            tokenizer_2=pipe.tokenizer_2,
            extras={"force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", False))},
        )

    def text_encoder_components(self, ckpt: Checkpoint, L: int, ids) -> list:
        return [self._text_encoder_2(ckpt, L, ids)]

    def time_ids(self, height: float, width: float) -> list[float]:
        """(original size, crop top-left, aesthetic score)."""
        return [height, width, 0.0, 0.0, 6.0]

    def manifest_facts(self, ckpt: Checkpoint) -> dict:
        return dict(super().manifest_facts(ckpt), requires_aesthetics_score=True)


def vae_components(ckpt: Checkpoint) -> list:
    """The VAE decoder and encoder, the same for every family. An AutoencoderKL's encoder gives its
    distribution's parameters (the runtime samples them), an AutoencoderTiny's the latents themselves."""
    import torch

    from .components import (BATCH, IMG_H, IMG_W, LAT_H, LAT_W, Component, TensorSpec, TinyVAEEncoder, VAEDecoder,
                             VAEEncoder)

    vae = ckpt.vae
    zc = vae.config.latent_channels
    tiny = vae_class(vae) == "AutoencoderTiny"
    # The VAE is validated at small sizes: its cost grows with pixels and no shape is special to it.
    vsmall = max(8, ckpt.unet.config.sample_size // 4)
    encoded = (TensorSpec("latents", "float32", [BATCH, zc, LAT_H, LAT_W]) if tiny
               else TensorSpec("latent_parameters", "float32", [BATCH, 2 * zc, LAT_H, LAT_W]))
    return [
        Component(
            "vae_decoder",
            VAEDecoder(vae),
            [TensorSpec("latent_sample", "float32", [BATCH, zc, LAT_H, LAT_W])],
            [TensorSpec("sample", "float32", [BATCH, 3, IMG_H, IMG_W])],
            lambda b, h, w: (torch.randn(b, zc, h, w),),
            [(1, vsmall, vsmall), (2, vsmall // 2, vsmall)],
        ),
        Component(
            "vae_encoder",
            TinyVAEEncoder(vae) if tiny else VAEEncoder(vae),
            [TensorSpec("sample", "float32", [BATCH, 3, IMG_H, IMG_W])],
            [encoded],
            lambda b, h, w: (torch.rand(b, 3, h * 8, w * 8) * 2 - 1,),
            [(1, vsmall, vsmall), (2, vsmall // 2, vsmall)],
        ),
    ]


def vae_class(vae) -> str:
    """The diffusers class of a checkpoint's VAE, refused unless sdrt runs it (runtime/vae.py)."""
    from .checkpoint import VAE_CLASSES

    name = type(vae).__name__
    if name not in VAE_CLASSES:
        raise CheckpointError(f"the VAE is a {name}; sdrt exports an {' or an '.join(VAE_CLASSES)}")
    return name


def vae_facts(vae, source) -> dict:
    """The manifest's ``vae`` record: the VAE's class, the --vae folder it came from (None: the checkpoint's
    own) and its tiling as the diffusers module sets it up (tile sizes in pixels and latents, overlap;
    AutoencoderTiny's spatial scale), which the runtime reproduces."""
    cls = vae_class(vae)
    size = vae.tile_sample_min_size
    tiling = {"sample_size": int(size[0] if isinstance(size, (list, tuple)) else size),
              "latent_size": int(vae.tile_latent_min_size), "overlap": float(vae.tile_overlap_factor)}
    rec = {"class": cls, "source": str(source) if source else None, "tiling": tiling}
    if cls == "AutoencoderTiny":
        tiling["scale"] = int(vae.spatial_scale_factor)
        # TAESD's byte quantization of latents (scale_latents); no pipeline uses it, recorded for completeness
        rec.update(latent_shift=float(vae.config.latent_shift), latent_magnitude=float(vae.config.latent_magnitude))
    return rec


FAMILIES: dict[str, StableDiffusion] = {
    f.name: f
    for f in (
        StableDiffusion("sd1", "Stable Diffusion 1.x", openclip=False),
        StableDiffusion("sd2", "Stable Diffusion 2.x", openclip=True),
        StableDiffusionXL(),
        StableDiffusionXLRefiner(),
    )
}


def supported() -> str:
    names = [f"{f.name} ({f.title})" for f in FAMILIES.values()]
    return f"{', '.join(names[:-1])} and {names[-1]}, text to image, image to image and inpainting"


def get(name: str) -> StableDiffusion:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown family {name!r}; sdrt supports {supported()}") from None


def detect(model_index: dict, text_encoder_config: dict, root: Path) -> tuple[StableDiffusion, str]:
    """(family, diffusers loader class name) of a checkpoint from its model_index.json and its text
    encoder's config.json; a one-line CheckpointError for anything sdrt cannot export."""
    cls = model_index.get("_class_name", "")
    if cls in UNSUPPORTED_PIPELINES:
        raise CheckpointError(f"{root} is a {UNSUPPORTED_PIPELINES[cls]} checkpoint ({cls}); sdrt supports {supported()}")
    for family in FAMILIES.values():
        loader = family.loader_for(cls)
        if loader is not None and family.claims(model_index, text_encoder_config):
            family.check_index(model_index, root)
            return family, loader
    raise CheckpointError(f"{root} holds a {cls or 'unnamed'} pipeline, not one sdrt can export; sdrt supports {supported()}")
