"""AUTOMATIC1111's names for sdrt's schedulers, both ways.

AUTOMATIC1111 (since 1.9) names a sampler and a schedule type separately ("DPM++ 2M" with "Karras");
older versions, and many clients, fold the schedule into the name ("DPM++ 2M Karras"). Both are read;
the separate form is written. Names compare case-insensitively, as AUTOMATIC1111 itself does.
"""

from __future__ import annotations

from .schedulers import SCHEDULER_NAMES

# sdrt scheduler -> (AUTOMATIC1111 sampler name, schedule type)
SAMPLERS = {
    "ddim": ("DDIM", "Automatic"),
    "pndm": ("PLMS", "Automatic"),
    "euler": ("Euler", "Automatic"),
    "euler-a": ("Euler a", "Automatic"),
    "lms": ("LMS", "Automatic"),
    "heun": ("Heun", "Automatic"),
    "dpm++2m": ("DPM++ 2M", "Automatic"),
    "dpm++2m-karras": ("DPM++ 2M", "Karras"),
    "dpm++2m-sde": ("DPM++ 2M SDE", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
    "lcm": ("LCM", "Automatic"),
}
assert tuple(SAMPLERS) == SCHEDULER_NAMES

# schedule types sdrt's ports follow for each name: "Automatic" is the scheduler config's own spacing
_BY_NAME = {}
for _scheduler, (_name, _schedule) in SAMPLERS.items():
    _BY_NAME[(_name.lower(), _schedule.lower())] = _scheduler
    if _schedule != "Automatic":
        _BY_NAME[(f"{_name} {_schedule}".lower(), "automatic")] = _scheduler  # "DPM++ 2M Karras"
_BY_NAME[("k_euler_a", "automatic")] = "euler-a"  # the k-diffusion names older clients send
_BY_NAME[("k_euler", "automatic")] = "euler"
_BY_NAME[("k_lms", "automatic")] = "lms"
_BY_NAME[("k_heun", "automatic")] = "heun"
_BY_NAME[("k_dpmpp_2m", "automatic")] = "dpm++2m"
_BY_NAME[("k_dpmpp_2m_ka", "automatic")] = "dpm++2m-karras"


def sampler_name(scheduler: str) -> tuple[str, str]:
    """sdrt scheduler name -> (AUTOMATIC1111 sampler name, schedule type), e.g. ("DPM++ 2M", "Karras")."""
    if scheduler not in SAMPLERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    return SAMPLERS[scheduler]


def scheduler_for(sampler: str, schedule_type: str | None = None) -> str:
    """AUTOMATIC1111 sampler name (and optional schedule type) -> sdrt scheduler name.

    Raises ValueError naming the samplers sdrt has when the pair is not one of them.
    """
    key = (sampler.strip().lower(), (schedule_type or "Automatic").strip().lower())
    if key in _BY_NAME:
        return _BY_NAME[key]
    if key[1] != "automatic" and (f"{key[0]} {key[1]}", "automatic") in _BY_NAME:
        return _BY_NAME[(f"{key[0]} {key[1]}", "automatic")]
    known = ", ".join(sorted({f"{n} ({s})" if s != "Automatic" else n for n, s in SAMPLERS.values()}))
    what = f"sampler {sampler!r}" + (f" with schedule type {schedule_type!r}" if schedule_type else "")
    raise ValueError(f"{what} is not one sdrt has; samplers: {known}")


def samplers() -> list[dict]:
    """The samplers as AUTOMATIC1111's GET /sdapi/v1/samplers lists them: name, aliases, options."""
    out = []
    for scheduler, (name, schedule) in SAMPLERS.items():
        if schedule != "Automatic":
            name = f"{name} {schedule}"
        out.append({"name": name, "aliases": [scheduler], "options": {}})
    return out
