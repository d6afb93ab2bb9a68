"""Samplers against loop-by-loop transcriptions of the original SD 2.1 samplers (tests/original_samplers.py)
and against diffusers' DDIMScheduler.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
import torch
from original_samplers import (
    OrigLatentDiffusion,
    OrigNoiseScheduleVP,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    orig_sample,
    original_alphas_cumprod,
)
from torch import nn

import sd.samplers as S
from sd.errors import SDError

# ---------------------------------------------------------------------------------------------------------
# A toy analytic "UNet" and a model object with the attributes sd.sample uses


class ToyUNet(nn.Module):
    """A smooth function of (x, t, context), so that errors in t, CFG order or v handling show."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, context):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        c = context.float().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return self.w * torch.tanh(x) * torch.cos(t / 700.0) + 0.2 * c + 0.05 * t / 1000.0


class Model:
    def __init__(self, unet, parameterization):
        self.unet = unet
        self.parameterization = parameterization
        self.alphas_cumprod = torch.tensor(original_alphas_cumprod(), dtype=torch.float32)


def inputs(shape=(2, 4, 8, 8), ctx_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    cond = torch.randn(shape[0], 77, ctx_dim, generator=g)
    uncond = torch.randn(shape[0], 77, ctx_dim, generator=g)
    return x_T, cond, uncond


# ---------------------------------------------------------------------------------------------------------
# Schedules


def test_ddim_timesteps_match_the_original():
    assert S.ddim_timesteps(50) == list(range(1, 1000, 20))
    assert S.ddim_timesteps(50)[-1] == 981
    assert S.ddim_timesteps(10) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    ts30 = S.ddim_timesteps(30)
    assert len(ts30) == 31 and ts30[:2] == [1, 34] and ts30[-1] == 991
    assert S.num_model_steps("plms", 30) == 31 and S.num_model_steps("dpm", 30) == 30
    for s in (1, 2, 4, 7, 30, 50, 250, 500):
        assert list(make_ddim_timesteps(s, 1000)) == S.ddim_timesteps(s)
    # Where the original's last timestep is 1000 (it crashes with an IndexError) that one is dropped.
    for s in (3, 9, 27, 37, 111, 333):
        assert (
            list(make_ddim_timesteps(s, 1000))[:-1] == S.ddim_timesteps(s) and len(S.ddim_timesteps(s)) == s
        )
    assert S.ddim_timesteps(3) == [1, 334, 667]


@pytest.mark.parametrize("steps", [0, -1, 501, 1000])
def test_ddim_timesteps_out_of_range(steps):
    with pytest.raises(SDError, match="steps"):
        S.ddim_timesteps(steps)


def test_ddim_schedule_values():
    ac = torch.tensor(original_alphas_cumprod(), dtype=torch.float32)
    assert float(ac[0]) == pytest.approx(0.99915, abs=1e-6)
    assert float(ac[1]) == pytest.approx(0.998296, abs=1e-6)
    assert float(ac[981]) == pytest.approx(0.0057755, rel=1e-4)
    assert float(ac[999]) == pytest.approx(0.0046601, rel=1e-4)
    ts, a_t, a_prev, sigma = S.ddim_schedule(ac, 50, eta=0.0)
    assert a_t[-1] == pytest.approx(0.0057755, rel=1e-4)
    assert a_prev[0] == pytest.approx(0.99915, abs=1e-6)  # the last step goes to ac[0], not 1
    assert a_prev[1:] == a_t[:-1]
    assert sigma == [0.0] * 50
    ref_sigma, ref_a, ref_prev = make_ddim_sampling_parameters(ac.numpy(), make_ddim_timesteps(50, 1000), 1.0)
    _, a_t, a_prev, sigma = S.ddim_schedule(ac, 50, eta=1.0)
    np.testing.assert_allclose(a_t, ref_a, rtol=1e-6)
    np.testing.assert_allclose(a_prev, ref_prev, rtol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-5)


def test_vp_log_alpha_interpolates_the_discrete_schedule():
    ac = torch.tensor(original_alphas_cumprod(), dtype=torch.float32)
    t = torch.tensor([1e-3, 0.0105, 0.5, 0.9815, 1.0], dtype=torch.float64)
    ours = S.vp_log_alpha(ac, t)
    ref = OrigNoiseScheduleVP(ac).marginal_log_mean_coeff(t.float())
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(ours[0]), 0.5 * np.log(float(ac[0])), rtol=1e-7)


def test_unknown_sampler_and_bad_eta():
    model = Model(ToyUNet(), "eps")
    x_T, cond, uncond = inputs()
    with pytest.raises(SDError, match="unknown sampler 'euler'"):
        S.sample(model, "euler", 5, cond, uncond, 9.0, x_T)
    with pytest.raises(SDError, match="eta"):
        S.sample(model, "plms", 5, cond, uncond, 9.0, x_T, eta=0.5)
    with pytest.raises(SDError, match="at least 2"):
        S.sample(model, "dpm", 1, cond, uncond, 9.0, x_T)


# ---------------------------------------------------------------------------------------------------------
# Full sampling runs against the transcribed originals


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmpp-2m"])
@pytest.mark.parametrize("steps", [10, 4, 3])
def test_toy_model_matches_original(sampler, parameterization, steps):
    unet = ToyUNet()
    x_T, cond, uncond = inputs()
    orig = OrigLatentDiffusion(unet, parameterization)
    torch.manual_seed(123)
    with torch.no_grad():
        ref = orig_sample(orig, sampler, steps, cond, uncond, 7.5, x_T)
        with _maybe_plms_warning(sampler, parameterization):
            ours = S.sample(Model(unet, parameterization), sampler, steps, cond, uncond, 7.5, x_T)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmpp-2m"])
def test_guidance_off_matches_original(sampler):
    unet = ToyUNet()
    x_T, cond, _ = inputs()
    with torch.no_grad():
        ref = orig_sample(OrigLatentDiffusion(unet), sampler, 6, cond, None, 1.0, x_T)
        ours = S.sample(Model(unet, "eps"), sampler, 6, cond, None, 1.0, x_T)
        ours_scale1 = S.sample(Model(unet, "eps"), sampler, 6, cond, cond * 0, 1.0, x_T)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours_scale1, ref, rtol=0, atol=1e-4)


def test_ddim_eta_uses_the_generator_stream_like_the_original_global_rng():
    unet = ToyUNet()
    x_T, cond, uncond = inputs()
    torch.manual_seed(7)
    with torch.no_grad():
        ref = orig_sample(OrigLatentDiffusion(unet, "v"), "ddim", 8, cond, uncond, 5.0, x_T, eta=0.8)
        after_ref = torch.randn(3)
        g = torch.Generator().manual_seed(7)
        ours = S.sample(Model(unet, "v"), "ddim", 8, cond, uncond, 5.0, x_T, eta=0.8, generator=g)
        after_ours = torch.randn(3, generator=g)
        again = S.sample(
            Model(unet, "v"),
            "ddim",
            8,
            cond,
            uncond,
            5.0,
            x_T,
            eta=0.8,
            generator=torch.Generator().manual_seed(7),
        )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert torch.equal(ours, again)
    assert torch.equal(after_ours, after_ref)  # same number of draws as the original


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
def test_noise_is_drawn_even_at_sigma_zero(sampler):
    """eta = 0 still consumes the generator as the original consumes the global RNG (S, or S + 1 for PLMS)."""
    unet = ToyUNet()
    x_T, cond, uncond = inputs()
    torch.manual_seed(3)
    with torch.no_grad():
        orig_sample(OrigLatentDiffusion(unet), sampler, 5, cond, uncond, 9.0, x_T)
        after_ref = torch.randn(3)
        g = torch.Generator().manual_seed(3)
        S.sample(Model(unet, "eps"), sampler, 5, cond, uncond, 9.0, x_T, generator=g)
    assert torch.equal(torch.randn(3, generator=g), after_ref)


def test_callback_sees_every_step():
    unet = ToyUNet()
    x_T, cond, uncond = inputs()
    for sampler, steps, expected in [("plms", 30, 31), ("ddim", 10, 10), ("dpm", 7, 7)]:
        seen = []
        with torch.no_grad():
            S.sample(Model(unet, "eps"), sampler, steps, cond, uncond, 9.0, x_T, callback=seen.append)
        assert [d["i"] for d in seen] == list(range(expected))
        assert set(seen[0]) == {"i", "t", "x", "denoised"}


def test_every_sampler_has_one_signature():
    params = {
        name: list(inspect.signature(spec.run).parameters.items()) for name, spec in S._SAMPLERS.items()
    }
    reference = params.pop("ddim")
    assert [p for p, _ in reference] == [
        "model_fn",
        "x_T",
        "alphas_cumprod",
        "steps",
        "eta",
        "generator",
        "callback",
    ]
    for name, sampler_params in params.items():
        assert sampler_params == reference, name


def test_dpm_leaves_the_generator_alone():
    x_T, cond, uncond = inputs()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        S.sample(Model(ToyUNet(), "eps"), "dpm", 4, cond, uncond, 9.0, x_T, generator=g)
    assert torch.equal(
        torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(9))
    )


def test_dpm_unet_times_are_float_and_descending():
    x_T, cond, uncond = inputs()
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    S.dpmpp_2m(model_fn, x_T, torch.tensor(original_alphas_cumprod(), dtype=torch.float32), 4)
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in seen)
    np.testing.assert_allclose([float(t[0]) for t in seen], [999.0, 749.25, 499.5, 249.75], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Second oracle: diffusers' DDIMScheduler configured as the original


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_matches_diffusers_scheduler(parameterization):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[parameterization],
    )
    unet = ToyUNet()
    x_T, cond, _ = inputs(shape=(1, 4, 8, 8))
    for steps in (10, 50):
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == S.ddim_timesteps(steps)[::-1]
        x = x_T
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t, cond), t, x, eta=0.0).prev_sample
            ours = S.sample(Model(unet, parameterization), "ddim", steps, cond, None, 1.0, x_T)
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# The tiny UNet of the `tiny` preset (random, seeded weights)


@pytest.fixture(scope="module")
def tiny_unet(tiny_model):
    return tiny_model.unet, tiny_model.config.unet.context_dim


@pytest.mark.parametrize(
    "sampler, parameterization",
    # PLMS treats v as eps (covered on the toy model): its v run would repeat the eps one.
    [("plms", "eps"), ("ddim", "eps"), ("dpmpp-2m", "eps"), ("ddim", "v"), ("dpmpp-2m", "v")],
)
def test_tiny_unet_matches_original(tiny_unet, sampler, parameterization):
    unet, ctx_dim = tiny_unet
    x_T, cond, uncond = inputs(shape=(1, 4, 8, 8), ctx_dim=ctx_dim)
    orig = OrigLatentDiffusion(unet, parameterization)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = orig_sample(orig, sampler, 10, cond, uncond, 9.0, x_T)
        with _maybe_plms_warning(sampler, parameterization):
            ours = S.sample(Model(unet, parameterization), sampler, 10, cond, uncond, 9.0, x_T)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-3)


def _maybe_plms_warning(sampler, parameterization):
    if sampler == "plms" and parameterization == "v":
        return pytest.warns(S.PLMSVPredictionWarning, match="treats the")
    return contextlib.nullcontext()
