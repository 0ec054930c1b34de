"""Schedulers parameterised by alpha_bar_t on integer training timesteps: DDIM, PNDM (PLMS), LCM."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Scheduler
from .schedule import alphas_cumprod_from_config, check_choice, check_disabled, spaced_timesteps

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


def _split(prediction_type: str, out: np.ndarray, x: np.ndarray, sa: float, sb: float):
    """(x0, eps) from a model output, with sa = sqrt(alpha_bar_t), sb = sqrt(1 - alpha_bar_t)."""
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    return sa * x - sb * out, sa * out + sb * x  # v-prediction (Salimans & Ho 2022, sec. 4)


class _AlphaScheduler(Scheduler):
    """Shared part: alpha_bar table, the value used past t=0, and variance-preserving add_noise."""

    prediction_types = ("epsilon", "v_prediction", "sample")
    uses_spacing = True

    def __init__(self, config: dict):
        super().__init__(config)
        check_disabled(config, ("thresholding",))
        check_choice("prediction_type", config["prediction_type"], self.prediction_types)
        if self.uses_spacing:
            check_choice("timestep_spacing", config["timestep_spacing"], ("linspace", "leading", "trailing"))
        self.alphas_cumprod = alphas_cumprod_from_config(config)
        # alpha_bar "before" t=0: 1 gives a clean final sample, alpha_bar_0 matches how SD was trained.
        self.final_alpha_cumprod = np.float32(1.0) if config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _abar(self, t) -> float:
        return float(self.alphas_cumprod[int(t)] if t >= 0 else self.final_alpha_cumprod)

    def _clip(self, x0: np.ndarray) -> np.ndarray:
        if self.config.get("clip_sample"):
            r = self.config["clip_sample_range"]
            return np.clip(x0, -r, r)
        return x0

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return a**0.5 * original_samples + (np.float32(1) - a) ** 0.5 * noise


class DDIM(_AlphaScheduler):
    """diffusers ``DDIMScheduler`` with eta = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12)."""

    name, diffusers_class = "ddim", "DDIMScheduler"
    defaults = dict(
        _BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
    )

    def _build(self, n: int) -> None:
        total = self.config["num_train_timesteps"]
        if n > total:
            raise ConfigError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={total}")
        self.timesteps = spaced_timesteps(self.config, n)
        # DDIM always jumps back by T // n, even for linspace / trailing spacing, as diffusers does.
        stride = total // n
        self._coefs = [
            (a**0.5, (1 - a) ** 0.5, ap**0.5, (1 - ap) ** 0.5)
            for a, ap in ((self._abar(t), self._abar(t - stride)) for t in self.timesteps)
        ]

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        sa, sb, sa_prev, sb_prev = self._coefs[i]
        x0, eps = _split(self.config["prediction_type"], model_output, sample, sa, sb)
        return sa_prev * self._clip(x0) + sb_prev * eps


class PNDM(_AlphaScheduler):
    """diffusers ``PNDMScheduler`` (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models").

    skip_prk_steps=True is the PLMS sampler Stable Diffusion uses; skip_prk_steps=False runs the three
    Runge-Kutta warm-up steps (12 model calls) first, exactly as diffusers' counter-driven state machine.
    """

    name, diffusers_class = "pndm", "PNDMScheduler"
    prediction_types = ("epsilon", "v_prediction")
    defaults = dict(
        _BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=0,
    )

    def _build(self, n: int) -> None:
        ts = spaced_timesteps(self.config, n)[::-1]  # ascending, as diffusers' _timesteps
        self._stride = self.config["num_train_timesteps"] // n
        if self.config["skip_prk_steps"]:
            # The second timestep is visited twice: PLMS bootstraps with a 2-call Heun-like step.
            self._prk = np.zeros(0)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            if n < 4:
                raise ConfigError(f"PNDM with skip_prk_steps=False needs num_inference_steps >= 4, got {n}")
            prk = ts[-4:].repeat(2) + np.tile([0, self._stride // 2], 4)
            self._prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ts[:-3][::-1]
        self.timesteps = np.concatenate([self._prk, plms]).astype(np.int64).astype(np.float64)

    def _reset(self) -> None:
        self._counter, self._ets, self._cur_sample, self._cur_out = 0, [], None, 0

    def _prev_sample(self, x, t, t_prev, out):
        """Liu et al. 2022, eq. 9: the transfer part phi(x_t, eps, t, t_prev) of the pseudo numerical method."""
        a, ap = self._abar(t), self._abar(t_prev)
        if self.config["prediction_type"] == "v_prediction":
            out = a**0.5 * out + (1 - a) ** 0.5 * x
        denom = a * (1 - ap) ** 0.5 + (a * (1 - a) * ap) ** 0.5
        return (ap / a) ** 0.5 * x - ((ap - a) / denom) * out

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        t, c = int(self.timesteps[i]), self._counter
        self._counter += 1
        if c < len(self._prk):
            return self._step_prk(model_output, t, sample, c)
        return self._step_plms(model_output, t, sample, c)

    def _step_prk(self, e, t, x, c):
        t_prev = t - (0 if c % 2 else self._stride // 2)
        t = int(self._prk[c // 4 * 4])
        if c % 4 == 0:
            self._cur_out = self._cur_out + e / 6
            self._ets.append(e)
            self._cur_sample = x
        elif c % 4 in (1, 2):
            self._cur_out = self._cur_out + e / 3
        else:
            e, self._cur_out = self._cur_out + e / 6, 0
        return self._prev_sample(self._cur_sample if self._cur_sample is not None else x, t, t_prev, e)

    def _step_plms(self, e, t, x, c):
        t_prev = t - self._stride
        if c != 1:
            self._ets = self._ets[-3:] + [e]
        else:  # second call re-evaluates the first timestep's target: finish the bootstrap step
            t, t_prev = t + self._stride, t
        ets = self._ets
        if len(ets) == 1 and c == 0:
            self._cur_sample = x
        elif len(ets) == 1 and c == 1:
            e, x, self._cur_sample = (e + ets[-1]) / 2, self._cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:  # 4th-order Adams-Bashforth
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return self._prev_sample(x, t, t_prev, e)


class LCM(_AlphaScheduler):
    """diffusers ``LCMScheduler`` (Luo et al. 2023, "Latent Consistency Models", Algorithm 1 / eq. 9)."""

    name, diffusers_class = "lcm", "LCMScheduler"
    uses_spacing = False  # LCM keeps timestep_spacing / steps_offset in its config but never reads them
    defaults = dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
        clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
        timestep_scaling=10.0, rescale_betas_zero_snr=False,
    )

    stochastic = True

    def needs_noise(self, i: int) -> bool:
        return i != len(self.timesteps) - 1  # the final step returns the denoised estimate itself

    def _build(self, n: int) -> None:
        total, original = self.config["num_train_timesteps"], self.config["original_inference_steps"]
        if original > total:
            raise ConfigError(f"original_inference_steps={original} cannot be larger than num_train_timesteps={total}")
        if n > original:
            raise ConfigError(f"num_inference_steps={n} cannot be larger than original_inference_steps={original}")
        # The distillation schedule: every (T // original)-th timestep; inference picks n of them evenly.
        origin = (np.arange(1, original + 1) * (total // original) - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.float64)
        coefs = []
        for k, t in enumerate(self.timesteps):
            t_prev = self.timesteps[k + 1] if k + 1 < n else t
            a, ap = self._abar(t), self._abar(t_prev)
            # Consistency-model boundary condition (sigma_data = 0.5): c_skip(0) = 1, c_out(0) = 0.
            st = float(t) * self.config["timestep_scaling"]
            c_skip, c_out = 0.25 / (st**2 + 0.25), st / (st**2 + 0.25) ** 0.5
            coefs.append((a**0.5, (1 - a) ** 0.5, ap**0.5, (1 - ap) ** 0.5, c_skip, c_out))
        self._coefs = coefs

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        sa, sb, sa_prev, sb_prev, c_skip, c_out = self._coefs[i]
        x0, _ = _split(self.config["prediction_type"], model_output, sample, sa, sb)
        denoised = c_out * self._clip(x0) + c_skip * sample
        if i == len(self.timesteps) - 1:
            return denoised
        # Multistep consistency sampling: re-noise the estimate to the next timestep.
        return sa_prev * denoised + sb_prev * noise
