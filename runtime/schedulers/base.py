"""Scheduler base class and diffusers-compatible config resolution."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def resolve_config(defaults: dict, config: dict | None, overrides: dict | None = None, hidden=()) -> dict:
    """What ``SchedulerClass.from_config(config, **overrides).config`` holds for the keys the class reads.

    Keys the class does not take are dropped, missing keys fall back to the class defaults, and keys listed
    in ``_use_default_values`` are treated as missing, as diffusers' ``extract_init_dict`` does. ``hidden``
    names keys that are not ``__init__`` arguments but that diffusers still registers onto the config and
    reads back (e.g. Heun's Karras conversion checks ``config.sigma_min``); they come from ``config`` only.
    """
    config = dict(config or {})
    for key in config.pop("_use_default_values", None) or ():
        config.pop(key, None)
    merged = {**config, **(overrides or {})}
    resolved = {key: merged.get(key, default) for key, default in defaults.items()}
    resolved.update({key: config[key] for key in hidden if key in config})
    return resolved


def check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    return int(num_inference_steps)


class Scheduler:
    """A schedule (arrays built once by ``set_timesteps``) plus a step rule.

    Every call is addressed by ``i``, the index into ``timesteps`` of the current model call, instead of
    by timestep value: diffusers' own step_index bookkeeping reduces to exactly that in the pipeline loop.
    Multistep history lives in a few explicit attributes reset by ``set_timesteps``.
    """

    name: str = ""
    diffusers_class: str = ""
    defaults: dict = {}
    hidden: tuple = ()
    order = 1
    stochastic = False  # whether step() takes fresh noise (ancestral and SDE samplers)

    def __init__(self, config: dict):
        self.config = config
        self.timesteps = np.zeros(0, np.float64)
        self.num_inference_steps = None
        self.init_noise_sigma = 1.0

    def needs_noise(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` uses its ``noise``: draw noise for exactly these steps and a generator
        is consumed as diffusers consumes its own (LCM, for one, draws nothing for its final step)."""
        return self.stochastic

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = check_steps(num_inference_steps)
        self._build(n)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def _build(self, n: int) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        pass

    def _check_step(self, i: int, noise):
        if self.num_inference_steps is None:
            raise ConfigError("call set_timesteps() before step()")
        if noise is None and self.needs_noise(i):
            raise ConfigError(f"scheduler {self.name!r} needs a `noise` array (standard normal, shaped like sample)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.diffusers_class}), {self.num_inference_steps} steps>"
