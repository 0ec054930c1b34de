"""The VAE as the runtime runs it: which kind it is, how latents are scaled on the way in and out, and
tiled decoding and encoding (``pipe.enable_vae_tiling()``), each reproducing diffusers 0.42.

Two kinds, as the manifest's ``vae.class`` records them (a model exported before sdrt recorded it has
an AutoencoderKL):

- ``AutoencoderKL``: the encoder gives a diagonal Gaussian's mean and log-variance, sampled with the
  request's noise (diffusers' retrieve_latents, sample_mode="sample"); tiles are ``sample_size`` pixels,
  overlapping by a quarter, blended linearly along the seams (AutoencoderKL.tiled_decode/_tiled_encode,
  blend_v, blend_h), and only an input larger than one tile is tiled.
- ``AutoencoderTiny`` (TAESD, Bohan 2023): the encoder gives the latents themselves, no noise is drawn;
  its scaling factor is 1.0 and its decoder already answers in [-1, 1], as diffusers' pipelines use it
  (``latent_shift``/``latent_magnitude`` only quantize latents to bytes, which no pipeline does). Tiles
  are 512 pixels, overlapping by an eighth, blended with ramps (AutoencoderTiny._tiled_decode/_tiled_encode),
  and with tiling on every input goes through the tiled path, as there.

The engines run each tile at its own size: the VAE graphs have dynamic height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import ModelDirError

KL, TINY = "AutoencoderKL", "AutoencoderTiny"
VAE_CLASSES = (KL, TINY)
Run = Callable[[np.ndarray], np.ndarray]  # one engine call: (N, C, H, W) -> (N, C', H', W')


@dataclass(frozen=True)
class Vae:
    """The facts of a model's VAE that decoding and encoding need, read from its manifest."""

    kind: str
    scaling_factor: float
    shift_factor: float | None
    tile_sample: int  # a tile's size in pixels (AutoencoderKL: config sample_size; AutoencoderTiny: 512)
    tile_latent: int  # ... and in latents
    overlap: float  # tile_overlap_factor
    scale: int  # pixels per latent (AutoencoderTiny's spatial_scale_factor)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Vae":
        rec = manifest.get("vae") or {}
        kind = rec.get("class", KL)
        if kind not in VAE_CLASSES:
            raise ModelDirError(f"sdrt.json: vae.class {kind!r} is not a VAE this sdrt runs ({', '.join(VAE_CLASSES)}); "
                                "upgrade sdrt, or re-export the model")
        scale = int(manifest["vae_scale_factor"])
        tiling = rec.get("tiling") or {}
        # before sdrt recorded the VAE's tile size: its native resolution, which is the VAE's sample_size
        # for SD 1.x, 2.x-base and SDXL
        sample = int(tiling.get("sample_size", manifest["native_resolution"]))
        try:
            return cls(kind, float(manifest["vae_scaling_factor"]), manifest.get("vae_shift_factor"), sample,
                       int(tiling.get("latent_size", sample // scale)), float(tiling.get("overlap", 0.25)),
                       int(tiling.get("scale", scale)))
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"sdrt.json: vae.tiling is malformed ({e}); re-export the model with `sdrt export --overwrite`") from e

    @property
    def samples(self) -> bool:
        """Whether encoding draws noise (a distribution to sample from) or gives the latents directly."""
        return self.kind == KL

    def decode(self, run: Run, latents: np.ndarray, tiled: bool = False) -> np.ndarray:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], as the pipelines' decode step:
        ``vae.decode(latents / scaling_factor)`` (+ shift where the VAE has one)."""
        z = latents / np.float32(self.scaling_factor)
        if self.shift_factor is not None:
            z = z + np.float32(self.shift_factor)
        z = z.astype(np.float32)
        if not tiled:
            return run(z)
        if self.kind == TINY:
            return tiny_tiled(run, z, self.tile_latent, self.overlap, up=self.scale)
        if max(z.shape[-2:]) <= self.tile_latent:
            return run(z)
        return kl_tiled(run, z, self.tile_latent, self.tile_sample, self.overlap)

    def encode(self, run: Run, image: np.ndarray, rng, tiled: bool = False) -> np.ndarray:
        """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, h, w): sampled from AutoencoderKL's
        distribution with ``rng`` (one standard-normal draw of the latents' shape), AutoencoderTiny's as they
        come; then shifted and times the scaling factor (the img2img pipelines' prepare_latents)."""
        if self.kind == TINY:
            latents = tiny_tiled(run, image, self.tile_sample, self.overlap, down=self.scale) if tiled else run(image)
        else:
            big = tiled and max(image.shape[-2:]) > self.tile_sample
            params = kl_tiled(run, image, self.tile_sample, self.tile_latent, self.overlap) if big else run(image)
            latents = sample_gaussian(params, rng)
        if self.shift_factor is not None:
            latents = latents - np.float32(self.shift_factor)
        return (latents * np.float32(self.scaling_factor)).astype(np.float32)

    def draw_unused_sample(self, rng, shape: tuple) -> None:
        """Draw the noise that sampling latents of ``shape`` would, without running the encoder: diffusers'
        4-channel inpainting encodes a masked image it never uses (AutoencoderTiny draws nothing)."""
        if self.samples:
            rng.standard_normal(shape, dtype=np.float32)


def sample_gaussian(params: np.ndarray, rng) -> np.ndarray:
    """(N, 2C, h, w) mean and log-variance -> a sample (N, C, h, w), as diffusers' DiagonalGaussianDistribution."""
    mean, logvar = np.split(params, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return mean + std * rng.standard_normal(mean.shape, dtype=np.float32)


# -- AutoencoderKL's tiling ------------------------------------------------------------------


def kl_tiled(run: Run, x: np.ndarray, tile_in: int, tile_out: int, overlap: float) -> np.ndarray:
    """AutoencoderKL.tiled_decode (``tile_in`` latents -> ``tile_out`` pixels) and _tiled_encode (pixels ->
    latent moments, the mean and log-variance blended alike, before sampling). Tiles of ``tile_in`` start
    every ``tile_in * (1 - overlap)``; each is blended into the one above and the one to its left over
    ``tile_out * overlap`` rows and columns, in place and in diffusers' order (a tile is blended with its
    neighbours after they were blended with theirs), then cropped to ``tile_out`` minus the blend."""
    step = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[run(np.ascontiguousarray(x[:, :, i : i + tile_in, j : j + tile_in])) for j in range(0, x.shape[3], step)]
            for i in range(0, x.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                blend_h(row[j - 1], tile, extent)
            out_row.append(tile[:, :, :keep, :keep])
        out_rows.append(np.concatenate(out_row, axis=3))
    return np.concatenate(out_rows, axis=2)


def _ramp(n: int) -> np.ndarray:
    return np.arange(n) / n  # y / extent, in double as Python computes it there


def blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's first rows <- a's last rows fading into b's (AutoencoderKL.blend_v), in place."""
    e = min(a.shape[2], b.shape[2], extent)
    w = _ramp(e)[:, None]
    b[:, :, :e, :] = a[:, :, a.shape[2] - e :, :] * (1 - w).astype(np.float32) + b[:, :, :e, :] * w.astype(np.float32)
    return b


def blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's first columns <- a's last columns fading into b's (AutoencoderKL.blend_h), in place."""
    e = min(a.shape[3], b.shape[3], extent)
    w = _ramp(e)
    b[:, :, :, :e] = a[:, :, :, a.shape[3] - e :] * (1 - w).astype(np.float32) + b[:, :, :, :e] * w.astype(np.float32)
    return b


# -- AutoencoderTiny's tiling ----------------------------------------------------------------


def tiny_tiled(run: Run, x: np.ndarray, tile: int, overlap: float, *, up: int = 0, down: int = 0) -> np.ndarray:
    """AutoencoderTiny._tiled_decode (``up``: latents -> ``up`` x the pixels) and _tiled_encode (``down``):
    tiles of ``tile`` input units every ``tile - blend`` (blend = tile * overlap), each written over the
    output with a mask ramping from 0 to 1 across its top rows (below the first row of tiles) and left
    columns (right of the first column), so later tiles fade in over earlier ones."""
    blend = int(tile * overlap)
    step = tile - blend

    def size(v):  # input units -> output units
        return v * up if up else v // down

    # (T,) ramp over a tile's first blend * up (or blend / down) output rows, float32 as torch computes it
    n_mask, ramp = (tile * up, blend * up - 1) if up else (tile / down, blend / down - 1)
    mask = np.clip(np.arange(n_mask, dtype=np.float32) / np.float32(ramp), 0, 1)
    out = None
    for i in range(0, x.shape[-2], step):
        for j in range(0, x.shape[-1], step):
            t = run(np.ascontiguousarray(x[..., i : i + tile, j : j + tile]))
            if out is None:
                out = np.zeros(x.shape[:1] + t.shape[1:2] + (size(x.shape[-2]), size(x.shape[-1])), np.float32)
            h, w = t.shape[-2:]
            m = (np.ones_like(mask) if i == 0 else mask)[:, None] * (np.ones_like(mask) if j == 0 else mask)[None, :]
            m = m[:h, :w]
            region = out[..., size(i) : size(i + tile), size(j) : size(j + tile)]
            region[...] = m * t + (1 - m) * region
    return out
