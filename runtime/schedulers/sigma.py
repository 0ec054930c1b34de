"""k-diffusion style samplers on the sigma (variance-exploding) parameterisation: Euler, Euler ancestral, LMS, Heun.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") write the
epsilon-model of a VP diffusion as a denoiser of x = x0 + sigma * eps; the UNet then sees
x / sqrt(sigma^2 + 1), which is what ``scale_model_input`` does.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedule import (
    alphas_cumprod_from_config,
    check_choice,
    check_disabled,
    interp_sigmas,
    karras_sigmas,
    sigma_range,
    sigma_to_t,
    spaced_timesteps,
    torch_linspace_f32,
    train_sigmas,
)

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_EXTRA_SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)


class _SigmaScheduler(Scheduler):
    prediction_types = ("epsilon", "v_prediction", "sample")
    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def __init__(self, config: dict):
        super().__init__(config)
        check_disabled(config, ("use_exponential_sigmas", "use_beta_sigmas"))
        check_choice("prediction_type", config["prediction_type"], self.prediction_types)
        check_choice("timestep_spacing", config["timestep_spacing"], ("linspace", "leading", "trailing"))
        self.alphas_cumprod = alphas_cumprod_from_config(config, self.beta_schedules, terminal_clamp=True)
        self._train_sigmas = train_sigmas(self.alphas_cumprod)
        self._log_sigmas = np.log(self._train_sigmas)

    def _spaced(self, n: int) -> np.ndarray:
        return spaced_timesteps(self.config, n, round_linspace=False).astype(np.float32)

    def _karras(self, sigmas: np.ndarray, n: int, cfg_range: bool = True):
        lo, hi = sigma_range(self.config if cfg_range else {}, sigmas)
        sigmas = karras_sigmas(lo, hi, n)
        return sigmas, sigma_to_t(sigmas, self._log_sigmas)

    def _finish(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        self.sigmas = sigmas.astype(np.float32)
        self.timesteps = timesteps.astype(np.float32).astype(np.float64)
        smax = self.sigmas.max()
        # Leading spacing starts below the largest training sigma, so the initial latent is taken as
        # x_T = x0 + sigma * eps with unit-variance x0 (diffusers' convention).
        self.init_noise_sigma = float(smax if self.config["timestep_spacing"] != "leading" else (smax**2 + 1) ** 0.5)
        self._in_div = (self.sigmas**2 + 1) ** 0.5

    def scale_model_input(self, sample, i):
        return sample / self._in_div[i]

    def add_noise(self, original_samples, noise, i):
        return original_samples + noise * self.sigmas[i]

    def _denoised(self, out, x, sigma):
        """x0 estimate (the Karras denoiser D(x; sigma)) from each prediction type."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return x - sigma * out
        if kind == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return out


class Euler(_SigmaScheduler):
    """diffusers ``EulerDiscreteScheduler``: Karras et al. 2022, Algorithm 2 with s_churn = 0."""

    name, diffusers_class = "euler", "EulerDiscreteScheduler"
    defaults = dict(
        _BETAS, prediction_type="epsilon", interpolation_type="linear", **_EXTRA_SIGMAS, sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero",
    )

    def __init__(self, config: dict):
        super().__init__(config)
        check_choice("interpolation_type", config["interpolation_type"], ("linear", "log_linear"))
        check_choice("timestep_type", config["timestep_type"], ("discrete", "continuous"))
        check_choice("final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))

    def _build(self, n: int) -> None:
        ts = self._spaced(n)
        if self.config["interpolation_type"] == "linear":
            sigmas = interp_sigmas(ts, self._train_sigmas)
        else:  # geometric in sigma over the full training range; n+1 points, as diffusers lays them
            ends = np.log(self._train_sigmas[[-1, 0]])
            sigmas = np.exp(torch_linspace_f32(ends[0], ends[1], n + 1))
        if self.config["use_karras_sigmas"]:
            sigmas, ts = self._karras(sigmas, n)
        a0 = self.alphas_cumprod[0]
        last = ((1 - a0) / a0) ** 0.5 if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction":
            ts = np.float32(0.25) * np.log(sigmas[:-1])  # EDM's c_noise = log(sigma) / 4
        self._finish(sigmas, ts)

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        sigma = self.sigmas[i]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (self.sigmas[i + 1] - sigma)


class EulerAncestral(_SigmaScheduler):
    """diffusers ``EulerAncestralDiscreteScheduler``: k-diffusion's ``sample_euler_ancestral`` (eta = 1).

    Each step goes down to sigma_down by Euler, then adds fresh noise of size sigma_up so the marginal
    lands on sigma_{i+1} (Song et al. 2021, "Score-Based Generative Modeling through SDEs", ancestral sampling).
    """

    name, diffusers_class = "euler-a", "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")
    defaults = dict(_BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
                    rescale_betas_zero_snr=False)

    stochastic = True

    def _build(self, n: int) -> None:
        ts = self._spaced(n)
        sigmas = np.concatenate([interp_sigmas(ts, self._train_sigmas), [0.0]]).astype(np.float32)
        self._finish(sigmas, ts)
        s_from, s_to = self.sigmas[:-1], self.sigmas[1:]
        self._up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        self._down = (s_to**2 - self._up**2) ** 0.5

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        sigma = self.sigmas[i]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (self._down[i] - sigma) + noise * self._up[i]


class LMS(_SigmaScheduler):
    """diffusers ``LMSDiscreteScheduler``: k-diffusion's ``sample_lms``, linear multistep of order <= 4.

    The Adams-style weights integrate Lagrange basis polynomials over [sigma_i, sigma_{i+1}]; they are
    polynomials of degree <= 3, so 3-point Gauss-Legendre quadrature is exact (diffusers uses scipy quad).
    """

    name, diffusers_class = "lms", "LMSDiscreteScheduler"
    max_order = 4
    defaults = dict(_BETAS, **_EXTRA_SIGMAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    _nodes, _weights = np.polynomial.legendre.leggauss(3)

    def _build(self, n: int) -> None:
        ts = self._spaced(n)
        sigmas = interp_sigmas(ts, self._train_sigmas)
        if self.config["use_karras_sigmas"]:
            sigmas, ts = self._karras(sigmas, n, cfg_range=False)  # LMS ignores config sigma_min/max
        self._finish(np.concatenate([sigmas, [0.0]]), ts)
        s = self.sigmas.astype(np.float64)
        self._coefs = []
        for i in range(n):
            # diffusers sizes the history by the global step index, even when img2img starts midway.
            order = min(i + 1, self.max_order)
            a, b = s[i], s[i + 1]
            tau = (b - a) / 2 * self._nodes + (a + b) / 2
            row = []
            for k in range(order):
                basis = np.ones_like(tau)
                for j in range(order):
                    if j != k:
                        basis *= (tau - s[i - j]) / (s[i - k] - s[i - j])
                row.append(float((b - a) / 2 * (self._weights @ basis)))
            self._coefs.append(row)

    def _reset(self) -> None:
        self._derivatives = []

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        sigma = self.sigmas[i]
        self._derivatives = (self._derivatives + [(sample - self._denoised(model_output, sample, sigma)) / sigma])[
            -self.max_order :
        ]
        update = None
        for c, d in zip(self._coefs[i], reversed(self._derivatives)):
            update = c * d if update is None else update + c * d
        return sample + update


class Heun(_SigmaScheduler):
    """diffusers ``HeunDiscreteScheduler``: Karras et al. 2022, Algorithm 1 (2nd-order Heun, s_churn = 0).

    Every interval costs two model calls, so ``timesteps`` repeats each interior timestep and ``order`` is 2.
    """

    name, diffusers_class = "heun", "HeunDiscreteScheduler"
    order = 2
    hidden = ("sigma_min", "sigma_max")
    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
    defaults = dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", **_EXTRA_SIGMAS, clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )

    def _build(self, n: int) -> None:
        ts = self._spaced(n)
        sigmas = interp_sigmas(ts, self._train_sigmas)
        if self.config["use_karras_sigmas"]:
            sigmas, ts = self._karras(sigmas, n)
        s = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        ts = ts.astype(np.float32)
        self._finish(np.concatenate([s[:1], s[1:-1].repeat(2), s[-1:]]), np.concatenate([ts[:1], ts[1:].repeat(2)]))

    def _reset(self) -> None:
        self._prev = None  # (derivative, dt, sample) of the pending Euler predictor

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        first = self._prev is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = self._denoised(model_output, sample, sigma if first else sigma_next)
        if self.config["clip_sample"]:
            x0 = np.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        if first:  # Euler predictor; its slope is kept for the corrector
            derivative, dt = (sample - x0) / sigma, sigma_next - sigma
            self._prev = (derivative, dt, sample)
        else:  # trapezoidal corrector, restarted from the predictor's starting point
            prev_derivative, dt, start = self._prev
            derivative = (prev_derivative + (sample - x0) / sigma_next) / 2
            sample, self._prev = start, None
        return sample + derivative * dt
