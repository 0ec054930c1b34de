"""Parity of the numpy schedulers (sdrt.runtime.schedulers) with diffusers, computed here against diffusers itself.

The diffusers side runs its pipelines' loop (StableDiffusion / Img2Img order), the port runs the runtime's own
loop function (sdrt.runtime.loop.denoise), both with the same deterministic fake UNet, the same initial noise and,
for stochastic samplers, the same per-step noise.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_name_for_config  # noqa: E402
from sdrt.runtime.loop import denoise  # noqa: E402
from sdrt.runtime.schedulers import scheduler_class  # noqa: E402

# diffusers' own schedulers hand torch tensors to np.array (numpy 2 DeprecationWarning); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning:diffusers")

SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
SD21 = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

# name -> (diffusers class, keys the name implies), written out independently of the module under test
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SHAPE = (2, 4, 8, 8)


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for the UNet: depends on the sample, the timestep and the channel."""
    c = np.arange(x.shape[1], dtype=np.float32).reshape(1, -1, 1, 1)
    return (np.float32(0.1) * x + np.float32(0.05) * np.sin(np.float32(t) / 100 + c)).astype(np.float32)


class _SimpsonQuad:
    """Stand-in for scipy.integrate (not installed here) inside diffusers' LMS module.

    LMS integrates Lagrange basis polynomials of degree <= 3, for which one Simpson panel is exact; this is
    independent of the Gauss-Legendre rule the port uses.
    """

    @staticmethod
    def quad(f, a, b, epsrel=None):
        a, b = float(a), float(b)
        return (b - a) / 6 * (float(f(a)) + 4 * float(f((a + b) / 2)) + float(f(b))), 0.0


def diffusers_class(class_name: str):
    if class_name == "LMSDiscreteScheduler":  # a dummy object when scipy is missing; the module itself imports
        from diffusers.schedulers import scheduling_lms_discrete

        if not hasattr(scheduling_lms_discrete, "integrate"):
            scheduling_lms_discrete.integrate = _SimpsonQuad
        return scheduling_lms_discrete.LMSDiscreteScheduler
    return getattr(diffusers, class_name)


def _inputs(seed: int = 0, steps: int = 64):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    init = (0.5 * rng.standard_normal(SHAPE)).astype(np.float32)
    step_noise = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    return noise, init, step_noise


def _start(n: int, order: int, strength):
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0) * order


def run_diffusers(name, config, overrides, n, strength, monkeypatch, seed=0):
    class_name, implied = DIFFUSERS[name] if name else (config["_class_name"], {})
    cls = diffusers_class(class_name)
    sched = cls.from_config(config, **{**overrides, **implied})
    sched.set_timesteps(n)
    ts = sched.timesteps
    noise, init, step_noise = _inputs(seed, len(ts) + 1)
    current = {"i": 0}
    # Stochastic steps draw from randn_tensor in the scheduler's module: feed them the predetermined noise.
    monkeypatch.setattr(
        sys.modules[cls.__module__], "randn_tensor", lambda *a, **k: torch.from_numpy(step_noise[current["i"]]),
        raising=False,
    )
    if strength is None:
        start, latents = 0, torch.from_numpy(noise) * sched.init_noise_sigma
        if (ts == ts[0]).sum() > 1:
            # diffusers looks the first step up by value and takes the *second* match, skipping steps (and
            # indexing past the end) when the first timestep repeats, e.g. Karras sigmas on a cosine schedule.
            # Pinning the start index gives the intended loop, which is what the index-based port runs.
            sched.set_begin_index(0)
    else:
        start = _start(n, sched.order, strength)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        latents = sched.add_noise(torch.from_numpy(init), torch.from_numpy(noise), ts[start : start + 1])
    extra = {}
    for i in range(start, len(ts)):
        current["i"] = i
        t = ts[i]
        x_in = sched.scale_model_input(latents, t)
        eps = torch.from_numpy(fake_unet(x_in.numpy(), float(t)))
        if "variance_noise" in inspect.signature(sched.step).parameters:
            extra = {"variance_noise": torch.from_numpy(step_noise[i])}
        latents = sched.step(eps, t, latents, **extra).prev_sample
    return sched, latents.numpy()


def run_numpy(name, config, overrides, n, strength, seed=0):
    """The port through the runtime's own loop (sdrt.runtime.loop.denoise), fed the same fake UNet and noise."""
    sched = make_scheduler(name, config, overrides)
    sched.set_timesteps(n)
    noise, init, step_noise = _inputs(seed, len(sched.timesteps) + 1)
    if strength is None:
        start, latents = 0, noise * np.float32(sched.init_noise_sigma)
    else:
        start = _start(n, sched.order, strength)
        latents = sched.add_noise(init, noise, start)
    current = {"i": start - 1}  # the step being taken: the model is called once per step, before its noise

    def model(x, t):
        current["i"] += 1
        return fake_unet(x, t)

    class StepNoise:  # step i's predetermined noise, as diffusers' patched randn_tensor gives it
        @staticmethod
        def standard_normal(shape, dtype=np.float32):
            assert tuple(shape) == SHAPE
            return step_noise[current["i"]]

    return sched, denoise(model, sched, latents, StepNoise(), start=start)


def check_parity(name, config, overrides, n, strength, monkeypatch):
    ref_sched, ref = run_diffusers(name, config, overrides, n, strength, monkeypatch)
    sched, out = run_numpy(name, config, overrides, n, strength)
    ref_ts = ref_sched.timesteps.numpy().astype(np.float64)
    assert sched.timesteps.dtype == np.float64
    np.testing.assert_allclose(sched.timesteps, ref_ts, rtol=0, atol=1e-3)
    assert sched.order == ref_sched.order
    ref_sigma = float(ref_sched.init_noise_sigma)
    assert abs(sched.init_noise_sigma - ref_sigma) <= 1e-5 * max(1.0, ref_sigma)
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert np.isfinite(ref).all()
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 2, 5, 25])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_txt2img_parity(name, n, config_id, monkeypatch):
    check_parity(name, CONFIGS[config_id], {}, n, None, monkeypatch)


@pytest.mark.parametrize("config_id,n", [("sd15", 10), ("sd21", 7)])
@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_parity(name, strength, config_id, n, monkeypatch):
    check_parity(name, CONFIGS[config_id], {}, n, strength, monkeypatch)


VARIANTS = {
    "spacing-leading": (SD15, {"timestep_spacing": "leading"}),
    "spacing-trailing": (SD15, {"timestep_spacing": "trailing"}),
    "spacing-linspace": (SD15, {"timestep_spacing": "linspace"}),
    "offset-0": (SDXL, {"steps_offset": 0}),
    "offset-1": (SDXL, {"steps_offset": 1}),
    "pred-epsilon": (SD21, {"prediction_type": "epsilon"}),
    "pred-v": (SD15, {"prediction_type": "v_prediction"}),
    "pred-sample": (SD15, {"prediction_type": "sample"}),
    "clip-sample": (SD15, {"clip_sample": True}),
    "alpha-to-one": (SD15, {"set_alpha_to_one": True}),
    "final-zero": (SD15, {"final_sigmas_type": "zero"}),
    "final-sigma-min": (SD15, {"final_sigmas_type": "sigma_min"}),
    "zero-snr-trailing": (SD21, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    "log-linear": (SDXL, {"interpolation_type": "log_linear"}),
    "beta-linear": (SD15, {"beta_schedule": "linear"}),
    "beta-cosine": (SD15, {"beta_schedule": "squaredcos_cap_v2"}),
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_parity(variant, name, monkeypatch):
    config, overrides = VARIANTS[variant]
    try:
        run_diffusers(name, config, overrides, 6, None, monkeypatch)
    except (ValueError, NotImplementedError):
        # diffusers rejects this combination (e.g. PNDM with sample prediction): so must the port
        with pytest.raises(ValueError):
            run_numpy(name, config, overrides, 6, None)
        return
    check_parity(name, config, overrides, 6, None, monkeypatch)


EXTRAS = [
    ("dpm++2m", SD15, {"solver_order": 3}, 8),
    ("dpm++2m", SD15, {"solver_order": 3, "lower_order_final": False}, 20),
    ("dpm++2m", SD15, {"solver_type": "heun"}, 6),
    ("dpm++2m", SD15, {"euler_at_final": True, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 16),
    ("dpm++2m", SD15, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 16),
    ("dpm++2m", SD15, {"use_lu_lambdas": True}, 8),
    ("dpm++2m", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, {"lambda_min_clipped": -5.1}, 8),
    ("dpm++2m", SD15, {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, 5),
    ("dpm++2m-karras", {**SD15, "sigma_min": 0.1, "sigma_max": 10.0}, {}, 8),
    ("dpm++2m-karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, {}, 8),
    ("dpm++2m-sde", SD15, {"solver_type": "heun"}, 6),
    ("dpm++2m-sde", SD15, {"solver_order": 3}, 8),
    ("dpm++2m-sde", SD15, {"use_karras_sigmas": True}, 8),
    ("unipc", SD15, {"solver_order": 3}, 8),
    ("unipc", SD15, {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 8),
    # bh1 and predict_x0=False give NaN in diffusers when the final sigma is zero (0 * inf): use sigma_min
    ("unipc", SD15, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 6),
    ("unipc", SD15, {"predict_x0": False, "final_sigmas_type": "sigma_min"}, 6),
    ("unipc", SD15, {"predict_x0": False, "prediction_type": "v_prediction", "solver_order": 3,
                     "final_sigmas_type": "sigma_min"}, 8),
    ("unipc", SD15, {"disable_corrector": [0, 2]}, 6),
    ("unipc", SD15, {"use_karras_sigmas": True}, 8),
    ("unipc", SD15, {"use_karras_sigmas": True, "sigma_min": 0.05, "final_sigmas_type": "sigma_min"}, 8),
    ("euler", SD15, {"use_karras_sigmas": True}, 10),
    ("euler", SDXL, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 12.0}, 10),
    ("euler", SD21, {"timestep_type": "continuous"}, 8),
    ("euler", SD21, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 8),
    ("lms", SD15, {"use_karras_sigmas": True}, 10),
    ("lms", SD21, {}, 3),
    ("heun", SD15, {"use_karras_sigmas": True}, 6),
    ("heun", {**SD15, "sigma_min": 0.3, "sigma_max": 9.0}, {"use_karras_sigmas": True}, 5),
    ("heun", SD15, {"beta_schedule": "exp"}, 5),
    ("heun", SD15, {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"}, 5),
    ("lcm", SD15, {"original_inference_steps": 100, "timestep_scaling": 5.0}, 8),
    ("lcm", SD21, {"clip_sample": True}, 4),
    ("pndm", SD15, {"skip_prk_steps": False}, 10),
    ("pndm", SD21, {"skip_prk_steps": False}, 4),
    ("ddim", SD15, {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 5),
    ("ddim", {**SD15, "_use_default_values": ["beta_end", "beta_schedule"]}, {}, 5),
    ("ddim", SD15, {"num_train_timesteps": 500}, 7),
    (None, SD15, {}, 5),
    (None, SD21, {}, 5),
    (None, SDXL, {"use_karras_sigmas": True}, 5),
    (None, {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
            "algorithm_type": "sde-dpmsolver++"}, {}, 6),
    (None, {**SD15, "_class_name": "LCMScheduler"}, {}, 4),
]


@pytest.mark.parametrize("name,config,overrides,n", EXTRAS, ids=lambda v: None)
def test_extra_parity(name, config, overrides, n, monkeypatch):
    check_parity(name, config, overrides, n, None, monkeypatch)
    check_parity(name, config, overrides, n, 0.7, monkeypatch)


# ---------------------------------------------------------------------------------------------- API


def test_names_and_default_names():
    assert SCHEDULER_NAMES == (
        "ddim", "pndm", "euler", "euler-a", "lms", "heun", "dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "unipc", "lcm",
    )
    expected = {
        "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler-a", "LMSDiscreteScheduler": "lms", "HeunDiscreteScheduler": "heun",
        "DPMSolverMultistepScheduler": "dpm++2m", "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm",
    }
    for class_name, name in expected.items():
        assert scheduler_name_for_config({**SD15, "_class_name": class_name}) == name
    dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler"}
    assert scheduler_name_for_config({**dpm, "use_karras_sigmas": True}) == "dpm++2m-karras"
    assert scheduler_name_for_config({**dpm, "algorithm_type": "sde-dpmsolver++"}) == "dpm++2m-sde"
    assert scheduler_name_for_config(SD15) == "pndm"
    assert scheduler_name_for_config(SD21) == "ddim"
    assert scheduler_name_for_config(SDXL) == "euler"
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler"):
        scheduler_name_for_config({**SD15, "_class_name": "KDPM2DiscreteScheduler"})
    assert make_scheduler(None, {**dpm, "use_karras_sigmas": True}).name == "dpm++2m-karras"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_defaults_match_diffusers_init(name):
    """Every port's default table is diffusers' __init__ signature (missing keys take these)."""
    cls = scheduler_class(name)
    params = inspect.signature(diffusers_class(cls.diffusers_class).__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert cls.defaults == expected


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        make_scheduler("foo", SD15)
    assert str(info.value) == f"unknown scheduler 'foo'; valid names: {', '.join(SCHEDULER_NAMES)}"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "lcm"])
@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_step_count(name, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler(name, SD15).set_timesteps(n)


@pytest.mark.parametrize(
    "name,overrides,key",
    [
        ("ddim", {"beta_schedule": "foo"}, "beta_schedule"),
        ("ddim", {"beta_schedule": "exp"}, "beta_schedule"),
        ("euler", {"timestep_spacing": "bogus"}, "timestep_spacing"),
        ("ddim", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("dpm++2m", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ("dpm++2m", {"solver_type": "rk4"}, "solver_type"),
        ("unipc", {"solver_type": "bh3"}, "solver_type"),
        ("euler", {"interpolation_type": "cubic"}, "interpolation_type"),
        ("euler", {"final_sigmas_type": "max"}, "final_sigmas_type"),
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("lms", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("dpm++2m", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("unipc", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("euler-a", {"prediction_type": "sample"}, "prediction_type"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ],
)
def test_unsupported_config_value(name, overrides, key):
    with pytest.raises(ValueError) as info:
        make_scheduler(name, SD15, overrides).set_timesteps(4)
    message = str(info.value)
    assert key in message and repr(overrides[key]) in message and "supported" in message


def test_noise_required_and_flags():
    needs = {n for n in SCHEDULER_NAMES if make_scheduler(n, SD15).stochastic}
    assert needs == {"euler-a", "dpm++2m-sde", "lcm"}
    for name in sorted(needs):
        sched = make_scheduler(name, SD15)
        sched.set_timesteps(3)
        x = np.zeros(SHAPE, np.float32)
        with pytest.raises(ValueError, match="noise"):
            sched.step(x, 0, x)
    lcm = make_scheduler("lcm", SD15)
    lcm.set_timesteps(1)
    assert not lcm.needs_noise(0)
    assert make_scheduler("heun", SD15).order == 2


def test_overrides_and_unknown_keys_ignored():
    sched = make_scheduler("ddim", {**SD15, "not_a_key": 3}, {"timestep_spacing": "trailing"})
    assert "not_a_key" not in sched.config and sched.config["timestep_spacing"] == "trailing"
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_any_batch_and_speed(name):
    sched = make_scheduler(name, SD15)
    sched.set_timesteps(20)
    rng = np.random.default_rng(0)
    for shape, budget in (((2, 4, 8, 8), 1e-3), ((1, 4, 64, 64), 5e-3), ((3, 4, 8, 8), 1e-3)):
        sched.set_timesteps(20)
        x = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        best = float("inf")
        for i in range(len(sched.timesteps)):
            t0 = time.perf_counter()
            x_in = sched.scale_model_input(x, i)
            x = sched.step(np.float32(0.1) * x_in, i, x, noise=noise)
            best = min(best, time.perf_counter() - t0)
        assert x.shape == shape and x.dtype == np.float32
        assert best < budget, f"{name} {shape}: {best * 1e3:.2f} ms per step"


def test_runtime_imports_only_numpy_and_stdlib():
    root = pathlib.Path(__file__).resolve().parents[1] / "runtime" / "schedulers"
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{path.name} imports {mod}"
