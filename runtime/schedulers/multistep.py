"""Exponential-integrator multistep solvers in log-SNR time: DPM-Solver++ (2M / 2M SDE / 3M) and UniPC.

Both work on the VP pair (alpha_t, sigma_t) = (1, sigma) / sqrt(1 + sigma^2) and lambda_t = log(alpha_t / sigma_t).
Each step reduces to a handful of scalar weights computed in float64 from the schedule, then one linear
combination of the current sample and the stored model outputs (k-diffusion style), so history is just a
short list of float32 arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
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
    train_sigmas,
)

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_UNSUPPORTED = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting")


def _combine(cx: float, x: np.ndarray, weights, arrays) -> np.ndarray:
    out = cx * x
    for w, a in zip(weights, arrays):
        out = out + w * a
    return out


class _Multistep(Scheduler):
    """Shared schedule bookkeeping: float32 sigmas as diffusers stores them, float64 alpha/sigma/lambda for weights."""

    prediction_types = ("epsilon", "sample", "v_prediction")

    def __init__(self, config: dict):
        super().__init__(config)
        check_disabled(config, _UNSUPPORTED)
        check_choice("prediction_type", config["prediction_type"], self.prediction_types)
        check_choice("timestep_spacing", config["timestep_spacing"], ("linspace", "leading", "trailing"))
        check_choice("final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
        if int(config["solver_order"]) != config["solver_order"] or config["solver_order"] < 1:
            raise ConfigError(f"unsupported solver_order={config['solver_order']!r}; supported values: 1, 2, 3")
        self.alphas_cumprod = alphas_cumprod_from_config(config, terminal_clamp=True)
        self._train_sigmas = train_sigmas(self.alphas_cumprod)
        self._log_sigmas = np.log(self._train_sigmas)

    def _final_sigma(self) -> float:
        a0 = self.alphas_cumprod[0]
        return float(((1 - a0) / a0) ** 0.5) if self.config["final_sigmas_type"] == "sigma_min" else 0.0

    def _finish(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        self.sigmas = np.asarray(sigmas, np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64).astype(np.float64)
        # float32 exactly as diffusers' _sigma_to_alpha_sigma_t, for the model-output conversions
        self._alpha32 = 1 / (self.sigmas**2 + 1) ** 0.5
        self._sigma32 = self.sigmas * self._alpha32
        a, s = self._alpha32.astype(np.float64), self._sigma32.astype(np.float64)
        with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, handled by the weights
            self._lambda = np.log(a) - np.log(s)
        self._alpha, self._sigma = a, s

    def _reset(self) -> None:
        self._outputs, self._lower = [], 0  # converted model outputs (newest last); steps taken so far

    def add_noise(self, original_samples, noise, i):
        return self._alpha32[i] * original_samples + self._sigma32[i] * noise

    def _to_x0(self, out, x, i):
        a, s = self._alpha32[i], self._sigma32[i]
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (x - s * out) / a
        if kind == "sample":
            return out
        return a * x - s * out


class DPMSolverPP(_Multistep):
    """diffusers ``DPMSolverMultistepScheduler`` with algorithm_type dpmsolver++ or sde-dpmsolver++.

    Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
    Algorithm 2 (multistep, data prediction) and its SDE counterpart SDE-DPM-Solver++(2M), which is
    k-diffusion's ``sample_dpmpp_2m_sde``.
    """

    name, diffusers_class = "dpm++2m", "DPMSolverMultistepScheduler"
    hidden = ("sigma_min", "sigma_max")
    defaults = dict(
        _BETAS, solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )

    def __init__(self, config: dict):
        # diffusers re-registers these aliases in __init__ (DEIS / UniPC configs loaded into DPM-Solver)
        config = dict(config)
        if config["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++") and config["final_sigmas_type"] == "zero":
            # diffusers checks this before aliasing, so it rejects 'deis' with a zero final sigma too
            raise ConfigError(
                f"unsupported final_sigmas_type='zero' with algorithm_type={config['algorithm_type']!r}; "
                "supported values: 'sigma_min'"
            )
        if config["algorithm_type"] == "deis":
            config["algorithm_type"] = "dpmsolver++"
        if config["solver_type"] in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        super().__init__(config)
        check_choice("algorithm_type", config["algorithm_type"], ("dpmsolver++", "sde-dpmsolver++"))
        check_choice("solver_type", config["solver_type"], ("midpoint", "heun"))
        check_choice("variance_type", config["variance_type"], (None, "learned", "learned_range"))
        self.sde = config["algorithm_type"] == "sde-dpmsolver++"
        ac = self.alphas_cumprod
        self._train_lambda = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # float32, as diffusers' lambda_t

    @property
    def stochastic(self) -> bool:
        return self.sde

    def _build(self, n: int) -> None:
        cfg = self.config
        # lambda_min_clipped drops the noisiest training timesteps (for cosine schedules near alpha_bar = 0)
        last = cfg["num_train_timesteps"] - int(np.searchsorted(self._train_lambda[::-1], cfg["lambda_min_clipped"]))
        ts = spaced_timesteps(cfg, n, extra=1, last=last)
        round_t = cfg["beta_schedule"] != "squaredcos_cap_v2"
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(*sigma_range(cfg, self._train_sigmas[::-1]), n)
            ts = sigma_to_t(sigmas, self._log_sigmas)
            ts = ts.round() if round_t else ts
        elif cfg["use_lu_lambdas"]:  # uniform in log sigma (Lu et al. 2022's "time-uniform in lambda")
            lambdas = self._log_sigmas[::-1]
            sigmas = np.exp(np.linspace(float(lambdas[0]), float(lambdas[-1]), n))
            ts = sigma_to_t(sigmas, self._log_sigmas)
            ts = ts.round() if round_t else ts
        else:
            sigmas = interp_sigmas(ts, self._train_sigmas)
        self._finish(np.concatenate([sigmas, [self._final_sigma()]]), ts)

    def _convert(self, out, x, i):
        if self.config["prediction_type"] == "epsilon" and self.config["variance_type"] is not None:
            out = out[:, :3]  # learned-variance models carry the variance in the extra channels
        return self._to_x0(out, x, i)

    def _weights(self, i: int, p: int):
        """(c_x, [w_m0, w_m1, w_m2], c_noise) of a p-th order DPM-Solver++ step from sigma_i to sigma_{i+1}."""
        lam, a, s = self._lambda, self._alpha, self._sigma
        with np.errstate(all="ignore"):
            h = lam[i + 1] - lam[i]
            if self.sde:
                e2 = np.exp(-2.0 * h)
                cx, c0, cn = s[i + 1] / s[i] * np.exp(-h), a[i + 1] * (1 - e2), s[i + 1] * np.sqrt(1 - e2)
                c1_mid, c1_heun = 0.5 * a[i + 1] * (1 - e2), a[i + 1] * ((1 - e2) / (-2.0 * h) + 1)
                c2 = a[i + 1] * ((1 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            else:
                e1 = np.exp(-h)
                cx, c0, cn = s[i + 1] / s[i], -a[i + 1] * (e1 - 1), 0.0
                c1_mid, c1_heun = -0.5 * a[i + 1] * (e1 - 1), a[i + 1] * ((e1 - 1) / h + 1)
                c2 = -a[i + 1] * ((e1 - 1 + h) / h**2 - 0.5)
            w = np.array([c0, 0.0, 0.0])
            if p == 2:  # D1 = (m0 - m1) / r0
                r0 = (lam[i] - lam[i - 1]) / h
                c1 = c1_mid if self.config["solver_type"] == "midpoint" else c1_heun
                w += c1 / r0 * np.array([1.0, -1.0, 0.0])
            elif p == 3:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0, d1_1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                w += c1_heun * d1 + c2 * d2
        return float(cx), w.tolist(), float(cn)

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        cfg, n, order = self.config, len(self.timesteps), self.config["solver_order"]
        short = cfg["lower_order_final"] and n < 15  # few-step runs are unstable at high order near t = 0
        final_first = i == n - 1 and (cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero")
        self._outputs = (self._outputs + [self._convert(model_output, sample, i)])[-order:]
        if order == 1 or self._lower < 1 or final_first:
            p = 1
        elif order == 2 or self._lower < 2 or (i == n - 2 and short):
            p = 2
        else:
            p = 3
        self._lower = min(self._lower + 1, order)
        cx, w, cn = self._weights(i, p)
        out = _combine(cx, sample, w[:p], self._outputs[::-1][:p])
        return out + cn * noise if self.sde else out


class UniPC(_Multistep):
    """diffusers ``UniPCMultistepScheduler`` (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework
    for Fast Sampling of Diffusion Models", Algorithms 1-2, B(h) variants bh1 / bh2).

    The corrector for step i-1 runs at the start of step i, reusing the model call made at the predicted point.
    """

    name, diffusers_class = "unipc", "UniPCMultistepScheduler"
    defaults = dict(
        _BETAS, solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
        sigma_max=None, shift_terminal=None,
    )

    def __init__(self, config: dict):
        config = dict(config)
        if config["solver_type"] in ("midpoint", "heun", "logrho"):
            config["solver_type"] = "bh2"  # diffusers' own alias, re-registered in __init__
        super().__init__(config)
        check_choice("solver_type", config["solver_type"], ("bh1", "bh2"))
        if config["solver_p"] is not None:
            raise ConfigError("unsupported solver_p (an external predictor scheduler); supported values: None")
        if config["shift_terminal"] is not None:
            raise ConfigError("unsupported shift_terminal (flow sigmas only); supported values: None")
        self._no_corrector = set(config["disable_corrector"] or ())

    def _build(self, n: int) -> None:
        cfg = self.config
        ts = spaced_timesteps(cfg, n, extra=1)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(*sigma_range(cfg, self._train_sigmas[::-1]), n)
            ts = sigma_to_t(sigmas, self._log_sigmas).round()
            last = float(sigmas[-1]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sigmas = interp_sigmas(ts, self._train_sigmas)
            last = self._final_sigma()
        self._finish(np.concatenate([sigmas, [last]]), ts)

    def _reset(self) -> None:
        super()._reset()
        self._last_sample, self._this_order = None, 1

    def _convert(self, out, x, i):
        if self.config["predict_x0"]:
            return self._to_x0(out, x, i)
        a, s = self._alpha32[i], self._sigma32[i]
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return out
        if kind == "sample":
            return (x - a * out) / s
        return a * out + s * x

    def _weights(self, t: int, s0: int, older, p: int, corrector: bool):
        """UniPC-p weights for an update from sigma index s0 to t.

        Returns (c_x, w) with w over [m0, m_1 .. m_{p-1}] (+ [m_new] for the corrector), where m_k is the
        model output stored at sigma index ``older[k-1]``.
        """
        lam, a, s = self._lambda, self._alpha, self._sigma
        x0 = self.config["predict_x0"]
        with np.errstate(all="ignore"):
            h = lam[t] - lam[s0]
            rks = np.array([(lam[k] - lam[s0]) / h for k in older] + [1.0])
            hh = -h if x0 else h
            h_phi_1 = np.expm1(hh)
            h_phi_k, factorial = h_phi_1 / hh - 1, 1
            b_h = hh if self.config["solver_type"] == "bh1" else np.expm1(hh)
            rows, b = [], []
            for k in range(1, p + 1):
                rows.append(rks ** (k - 1))
                b.append(h_phi_k * factorial / b_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            rows, b = np.array(rows), np.array(b)
            if corrector:
                rhos = np.array([0.5]) if p == 1 else np.linalg.solve(rows, b)
            else:
                rhos = np.zeros(0) if p == 1 else np.array([0.5]) if p == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
            cx, cm = (s[t] / s[s0], a[t]) if x0 else (a[t] / a[s0], s[t])
            w = np.zeros(p + (1 if corrector else 0))
            w[0] = -cm * h_phi_1
            # D_k = (m_k - m0) / r_k, and for the corrector D_t = m_new - m0
            for k in range(p - 1):
                c = -cm * b_h * rhos[k] / rks[k]
                w[k + 1] += c
                w[0] -= c
            if corrector:
                c = -cm * b_h * rhos[-1]
                w[p] += c
                w[0] -= c
        return float(cx), w.tolist()

    def step(self, model_output, i, sample, noise=None):
        self._check_step(i, noise)
        cfg, n, order = self.config, len(self.timesteps), self.config["solver_order"]
        m_new = self._convert(model_output, sample, i)
        if i > 0 and (i - 1) not in self._no_corrector and self._last_sample is not None:
            p = self._this_order
            cx, w = self._weights(i, i - 1, [i - 1 - k for k in range(1, p)], p, corrector=True)
            sample = _combine(cx, self._last_sample, w, self._outputs[::-1][:p] + [m_new])
        self._outputs = (self._outputs + [m_new])[-order:]
        p = min(order, n - i) if cfg["lower_order_final"] else order
        p = self._this_order = min(p, self._lower + 1)
        self._last_sample = sample
        cx, w = self._weights(i + 1, i, [i - k for k in range(1, p)], p, corrector=False)
        self._lower = min(self._lower + 1, order)
        return _combine(cx, sample, w, self._outputs[::-1][:p])
