"""Numpy ports of diffusers schedulers (reference: diffusers 0.42.1). Imports numpy and the standard library only.

    sched = make_scheduler("euler-a", scheduler_config_json_dict)
    sched.set_timesteps(30)
    latents = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(latents, i), t)
        noise = rng.standard_normal(latents.shape) if sched.needs_noise(i) else None
        latents = sched.step(eps, i, latents, noise=noise)

(``sdrt.runtime.loop.denoise`` is that loop, with the checks and timings the pipeline needs.)

Each scheduler is configured exactly as ``SchedulerClass.from_config(config, **overrides)`` would be, and steps
are addressed by index into ``timesteps`` rather than by timestep value.
"""

from __future__ import annotations

from ..errors import ConfigError
from .alpha import DDIM, LCM, PNDM
from .base import Scheduler, resolve_config
from .multistep import DPMSolverPP, UniPC
from .sigma import LMS, Euler, EulerAncestral, Heun

__all__ = ["SCHEDULER_NAMES", "Scheduler", "diffusers_equivalent", "make_scheduler", "scheduler_class", "scheduler_name_for_config"]

# name -> (class, config keys the name itself implies)
_SCHEDULERS = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "euler": (Euler, {}),
    "euler-a": (EulerAncestral, {}),
    "lms": (LMS, {}),
    "heun": (Heun, {}),
    "dpm++2m": (DPMSolverPP, {}),
    "dpm++2m-karras": (DPMSolverPP, {"use_karras_sigmas": True}),
    "dpm++2m-sde": (DPMSolverPP, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPC, {}),
    "lcm": (LCM, {}),
}
# The names users pass (Pipeline(scheduler=...), --scheduler), in this order everywhere they are listed.
SCHEDULER_NAMES = tuple(_SCHEDULERS)
_BY_CLASS = {cls.diffusers_class: name for name, (cls, implied) in _SCHEDULERS.items() if not implied}


def scheduler_class(name: str) -> type[Scheduler]:
    """The port class behind ``name`` (one of SCHEDULER_NAMES)."""
    if name not in _SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    return _SCHEDULERS[name][0]


def diffusers_equivalent(name: str) -> tuple[str, dict]:
    """(diffusers class name, config keys the name implies): what ``name`` is in diffusers, e.g.
    "dpm++2m-karras" -> ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})."""
    cls = scheduler_class(name)
    return cls.diffusers_class, dict(_SCHEDULERS[name][1])


def scheduler_name_for_config(config: dict) -> str:
    """The name that reproduces a checkpoint's own scheduler (its ``_class_name``)."""
    class_name = (config or {}).get("_class_name")
    if class_name == DPMSolverPP.diffusers_class:
        if config.get("algorithm_type") == "sde-dpmsolver++":
            return "dpm++2m-sde"
        return "dpm++2m-karras" if config.get("use_karras_sigmas") else "dpm++2m"
    if class_name not in _BY_CLASS:
        raise ConfigError(
            f"unsupported scheduler class {class_name!r}; supported classes: {', '.join(sorted(_BY_CLASS))}"
        )
    return _BY_CLASS[class_name]


def make_scheduler(name: str | None, config: dict, overrides: dict | None = None) -> Scheduler:
    """Build the scheduler ``name`` (one of SCHEDULER_NAMES, or None for the checkpoint's own class).

    ``config`` is a checkpoint's scheduler_config.json as a dict; ``overrides`` replaces keys of it for this call.
    Keys the class does not read are ignored and missing keys take that class's diffusers defaults. A config
    value the port does not implement raises ValueError naming the key, the value and the supported values.
    """
    config = dict(config or {})
    overrides = dict(overrides or {})
    if name is None:
        cls, _ = _SCHEDULERS[scheduler_name_for_config(config)]
    else:
        cls = scheduler_class(name)
        overrides.update(_SCHEDULERS[name][1])
    scheduler = cls(resolve_config(cls.defaults, config, overrides, cls.hidden))
    scheduler.name = name or scheduler_name_for_config({**scheduler.config, "_class_name": cls.diffusers_class})
    return scheduler
