"""Generation parameters as AUTOMATIC1111 writes them in a PNG's ``parameters`` text chunk (its
"infotext"), both ways: what community readers, image sites and AUTOMATIC1111's own PNG Info parse.

    a castle on a hill, oil painting
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15

``create_infotext`` follows AUTOMATIC1111's modules/processing.py ``create_infotext``: the prompt, a
``Negative prompt:`` line when there is one, then ``key: value`` pairs joined by ", ", a value quoted
as JSON when it holds a comma, a colon or a newline (infotext_utils.quote). ``parse_infotext`` follows
modules/infotext_utils.py ``parse_generation_parameters``: the last line is the parameters when it
holds at least three pairs; ``WxH`` values split into ``-1``/``-2`` keys.
"""

from __future__ import annotations

import json
import re

from .a1111 import sampler_name, scheduler_for

# AUTOMATIC1111's re_param (infotext_utils.py) and its image size pattern
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(text) -> str:
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def create_infotext(params: dict) -> str:
    """AUTOMATIC1111's infotext for one image from sdrt's record of its call (``PipelineOutput.parameters``)."""
    sampler, schedule = sampler_name(params["scheduler"]) if params.get("scheduler") else (None, None)
    size = f"{params['width']}x{params['height']}" if params.get("width") and params.get("height") else None
    fields = {
        "Steps": params.get("num_inference_steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": size,
        "Model hash": params.get("model_hash"),
        "Model": params.get("model"),
        "Denoising strength": params.get("strength"),
        "Lora hashes": params.get("lora_hashes"),
        "Version": params.get("version"),
    }
    text = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    prompt = _first(params.get("prompt")) or ""
    negative = _first(params.get("negative_prompt"))
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{text}".strip()


def parse_infotext(text: str) -> dict:
    """AUTOMATIC1111's parse_generation_parameters, without the webui's own defaults and settings:
    {"Prompt": ..., "Negative prompt": ..., "Steps": "25", "Size-1": "512", "Size-2": "512", ...}."""
    res = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def call_arguments(info: dict) -> dict:
    """A parsed infotext -> sdrt's record keys (prompt, negative_prompt, num_inference_steps, guidance_scale,
    seed, width, height, scheduler, strength, model): what ``sdrt generate --from-png`` runs with."""
    out = {"prompt": info.get("Prompt", ""), "negative_prompt": info.get("Negative prompt") or None}
    for key, name, cast in (("Steps", "num_inference_steps", int), ("CFG scale", "guidance_scale", float),
                            ("Seed", "seed", int), ("Size-1", "width", int), ("Size-2", "height", int),
                            ("Denoising strength", "strength", float)):
        if key in info:
            try:
                out[name] = cast(info[key])
            except ValueError:
                raise ValueError(f"the PNG's parameters give {key} {info[key]!r}, not a number") from None
    if "Sampler" in info:
        out["scheduler"] = scheduler_for(info["Sampler"], info.get("Schedule type"))
    if "Model" in info:
        out["model"] = info["Model"]
    return out
