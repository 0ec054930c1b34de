"""Noise schedules shared by every scheduler: betas, alphas_cumprod, timestep spacing, sigma tables.

All of this runs once per construction or ``set_timesteps``, never per step. Arrays are float32 wherever
diffusers keeps them as torch float32 tensors, so the step rules see the same noise levels as diffusers.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


def check_choice(key: str, value, supported) -> None:
    if value not in supported:
        raise ConfigError(f"unsupported {key}={value!r}; supported values: {', '.join(map(str, supported))}")


def check_disabled(config: dict, keys) -> None:
    """Reject switches the port does not implement rather than silently sampling a different schedule."""
    for key in keys:
        if config.get(key):
            raise ConfigError(f"unsupported {key}={config[key]!r}; supported values: False (not supported by sdrt)")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (CPU kernel).

    np.linspace rounds differently in about 15% of the betas; matching torch keeps alphas_cumprod, and so
    every sigma and timestep derived from it, identical to the reference.
    """
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float64((end - start) / np.float32(steps - 1))  # torch forms the step in float32
    i = np.arange(steps, dtype=np.float64)
    # Each point is one fused multiply-add from the nearer end; a float64 product rounds the same way.
    out = np.where(i < steps // 2, np.float64(start) + step * i, np.float64(end) - step * (steps - 1 - i))
    return out.astype(np.float32)


def _alpha_bar_betas(n: int, alpha_bar) -> np.ndarray:
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return np.asarray(betas, np.float32)


def betas_from_config(cfg: dict, schedules=("linear", "scaled_linear", "squaredcos_cap_v2")) -> np.ndarray:
    """Training betas (float32), as every diffusers scheduler's ``__init__`` builds them."""
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    kind = cfg["beta_schedule"]
    check_choice("beta_schedule", kind, schedules)
    if kind == "linear":
        return torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    if kind == "scaled_linear":  # linear in sqrt(beta): the LDM / Stable Diffusion schedule
        return torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, "Improved DDPM", eq. 17
        return _alpha_bar_betas(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    return _alpha_bar_betas(n, lambda t: math.exp(t * -12.0))  # "exp" (Heun only)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch accumulates a float32 cumprod in double; a float32 running product drifts by up to 1e-6.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1."""
    abar_sqrt = np.sqrt(cumprod_f32(np.float32(1) - betas))
    a0, at = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - at) * (a0 / (a0 - at))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def alphas_cumprod_from_config(
    cfg: dict, schedules=("linear", "scaled_linear", "squaredcos_cap_v2"), *, terminal_clamp: bool = False
) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1 (float32).

    ``terminal_clamp``: the sigma-parameterised schedulers cannot represent alpha_bar = 0 (sigma = inf),
    so after zero-SNR rescaling diffusers pins the last value to 2**-24.
    """
    betas = betas_from_config(cfg, schedules)
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    ac = cumprod_f32(np.float32(1) - betas)
    if cfg.get("rescale_betas_zero_snr") and terminal_clamp:
        ac[-1] = 2.0**-24
    return ac


def spaced_timesteps(cfg: dict, n: int, *, extra: int = 0, last: int | None = None, round_linspace: bool = True):
    """Descending float64 timesteps for ``cfg["timestep_spacing"]`` (Lin et al. 2023, Table 2).

    ``extra=1`` is the DPM-Solver / UniPC layout: n+1 points whose final (t=0) point is dropped.
    ``last`` shortens the range (DPM-Solver's lambda_min_clipped). Euler-style schedulers keep linspace
    points fractional (``round_linspace=False``); the others round them to integers.
    """
    spacing, total = cfg["timestep_spacing"], cfg["num_train_timesteps"]
    check_choice("timestep_spacing", spacing, ("linspace", "leading", "trailing"))
    last = total if last is None else last
    if spacing == "linspace":
        t = np.linspace(0, last - 1, n + extra)
        if round_linspace:
            t = t.round()
        return t[::-1][:n].copy()
    if spacing == "leading":
        ratio = last // (n + extra)
        return (np.arange(n + extra) * ratio)[::-1][:n].astype(np.float64) + cfg["steps_offset"]
    # trailing: the stride comes from the full range even when `last` is clipped, as in diffusers
    return np.round(np.arange(last, 0, -total / n)) - 1


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion's sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep (float32)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigma at fractional timesteps, linear in t (float64, as np.interp returns)."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def sigma_range(cfg: dict, in_sigmas: np.ndarray) -> tuple[float, float]:
    """Karras end points: config sigma_min / sigma_max when given, else the ends of ``in_sigmas``."""
    lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
    return (float(in_sigmas[-1]) if lo is None else lo), (float(in_sigmas[0]) if hi is None else hi)
