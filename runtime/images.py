"""Images in and out: init images and masks preprocessed as diffusers' VaeImageProcessor does, and PNGs
written with the generation parameters in a text chunk, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import GenerationError
from .files import write_atomic

PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's infotext
SDRT_KEY = "sdrt"  # sdrt's full record, JSON
MASK_MODES = ("1", "L", "RGB")  # grayscale or RGB; anything else (RGBA, palette, CMYK) is refused


def open_image(image, what: str = "init image"):
    """A path is read into a PIL image (a clear error if it cannot be); anything else is returned as is."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                return im
        except (OSError, UnidentifiedImageError) as e:
            raise GenerationError(f"cannot read the {what} {image}: {e}") from e
    return image


def _size(image) -> tuple[int, int] | None:
    """(width, height) of a PIL image or numpy array (None for anything else)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return tuple(image.size)
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        hw = image.shape[-3:-1] if image.ndim >= 3 and image.shape[-1] in (1, 3) else image.shape[-2:]
        return int(hw[1]), int(hw[0])
    return None


def load_image(image, height: int, width: int, what: str = "init image", normalize: bool = True) -> np.ndarray:
    """An init image -> (N, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess:
    a path or PIL image is resized (Lanczos) to height x width; numpy input (N, H, W, 3) or
    (H, W, 3) in [0, 1] is taken as is. ``normalize=False`` keeps [0, 1] (a ControlNet's control image:
    diffusers' control_image_processor, do_normalize=False)."""
    from PIL import Image

    image = open_image(image, what)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        arr = np.asarray(image, dtype=np.float32)[None] / 255.0
    elif isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise GenerationError(f"a numpy {what} must be (H, W, 3) or (N, H, W, 3) in [0, 1], got shape {image.shape}")
        if arr.shape[1:3] != (height, width):
            raise GenerationError(f"the {what} is {arr.shape[2]}x{arr.shape[1]}, the call asks for {width}x{height}")
    else:
        raise GenerationError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    arr = arr.transpose(0, 3, 1, 2)
    return (arr * 2.0 - 1.0).astype(np.float32) if normalize else np.ascontiguousarray(arr, dtype=np.float32)


def load_mask(mask, height: int, width: int, image=None) -> np.ndarray:
    """An inpainting mask -> (N, 1, H, W) float32 of 0 (keep) and 1 (repaint), as diffusers' mask
    processor (VaeImageProcessor with do_binarize, do_convert_grayscale, no normalization): a path or
    PIL image is resized (Lanczos) to height x width, then made grayscale; numpy input (H, W),
    (H, W, 1), (N, H, W, 1) or RGB (H, W, 3) in [0, 1] is taken at its size. Values >= 0.5 are
    repainted. ``image`` (the init image, already opened: open_image) is checked to be the mask's size."""
    from PIL import Image

    mask = open_image(mask, "mask image")
    msize, isize = _size(mask), _size(image)
    if msize is not None and isize is not None and msize != isize:
        raise GenerationError(
            f"mask_image is {msize[0]}x{msize[1]} but image is {isize[0]}x{isize[1]}; give a mask of the image's size"
        )
    if isinstance(mask, Image.Image):
        if mask.mode not in MASK_MODES:
            raise GenerationError(
                f"mask_image must be grayscale or RGB, got a {mask.mode} image; convert it (PIL: mask.convert('L'))"
            )
        if mask.size != (width, height):
            mask = mask.resize((width, height), resample=Image.LANCZOS)
        arr = np.asarray(mask.convert("L"), dtype=np.float32)[None, None] / 255.0
    elif isinstance(mask, np.ndarray):
        arr = mask.astype(np.float32)
        if arr.ndim in (3, 4) and arr.shape[-1] not in (1, 3) and arr.shape[-1] <= 4:
            raise GenerationError(f"mask_image must be grayscale or RGB, got a numpy array of shape {mask.shape}")
        if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB: PIL's "L" conversion (ITU-R 601-2 luma)
            arr = arr @ np.array([0.299, 0.587, 0.114], np.float32)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise GenerationError(
                f"a numpy mask_image must be (H, W), (H, W, 1), (N, H, W, 1) or RGB (H, W, 3) in [0, 1], got shape {mask.shape}"
            )
        if arr.shape[1:] != (height, width):
            raise GenerationError(f"the mask image is {arr.shape[2]}x{arr.shape[1]}, the call asks for {width}x{height}")
        arr = arr[:, None]
    else:
        raise GenerationError(f"mask_image must be a path, a PIL image or a numpy array, got {type(mask).__name__}")
    return (arr >= 0.5).astype(np.float32)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(N, 1, H, W) -> (N, 1, H/f, W/f) by nearest neighbour, as torch.nn.functional.interpolate's default
    mode (source index floor(i * in / out)) that diffusers resizes the mask to the latents with."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    rows = np.floor(np.arange(h) * (mask.shape[-2] / h)).astype(np.int64)
    cols = np.floor(np.arange(w) * (mask.shape[-1] / w)).astype(np.int64)
    return np.ascontiguousarray(mask[..., rows[:, None], cols[None, :]])


def output_paths(out: str | Path, n: int) -> list[Path]:
    """One image: ``out`` itself; several: ``stem-0.png``, ``stem-1.png``, ..."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(out.suffix + ".png") if out.suffix else out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def save_png(image, path: str | Path, parameters: dict) -> Path:
    """Save a PIL image as PNG with the generation parameters in two text chunks: ``parameters`` in
    AUTOMATIC1111's infotext format (what community tools read) and ``sdrt``, sdrt's full record as JSON.
    A failure leaves no partial file."""
    from PIL.PngImagePlugin import PngInfo

    from .infotext import create_infotext

    path = Path(path)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, create_infotext(parameters))  # tEXt, iTXt past Latin-1: as AUTOMATIC1111
    info.add_text(SDRT_KEY, json.dumps(parameters, default=str, ensure_ascii=True))
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
    return path


def read_parameters(path: str | Path) -> dict:
    """The generation parameters of a PNG: sdrt's record (the ``sdrt`` chunk; before sdrt had one, JSON in
    ``parameters``), else those of AUTOMATIC1111's ``parameters`` infotext in sdrt's keys
    (infotext.call_arguments). GenerationError when the PNG has neither."""
    from PIL import Image, UnidentifiedImageError

    from .infotext import call_arguments, parse_infotext

    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as e:
        raise GenerationError(f"cannot read the PNG {path}: {e}") from e
    for key in (SDRT_KEY, PARAMETERS_KEY):
        try:
            record = json.loads(text.get(key, ""))
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
    if not text.get(PARAMETERS_KEY):
        raise GenerationError(f"{path} has no generation parameters (no {SDRT_KEY!r} or {PARAMETERS_KEY!r} text chunk)")
    try:
        return call_arguments(parse_infotext(text[PARAMETERS_KEY]))
    except ValueError as e:
        raise GenerationError(f"{path}: {e}") from e
