"""Samplers: PLMS, DDIM and DPM-Solver++(2M), reproducing SD 2.1's original samplers step for step.

Each sampler is a pure function in k-diffusion's shape, all with one signature::

    x_0 = sampler(model_fn, x_T, alphas_cumprod, steps, *, eta=0.0, generator=None, callback=None)

registered by name in `_SAMPLERS` (eta applies to DDIM only; DPM-Solver++ draws no noise, so it leaves
`generator` alone).

`model_fn(x, t)` returns the noise prediction eps for latents `x` at UNet timestep `t`, a (B,) tensor:
int64 for DDIM/PLMS (the original's discrete timesteps), float32 for DPM-Solver (its continuous time mapped
to (t - 1/N) * 1000). `sample()` builds that `model_fn` from a model: classifier-free guidance on the
[uncond; cond] batch and v -> eps conversion. The schedules (timesteps, alphas) are those of
`ldm/models/diffusion/{ddim,plms}.py` and `dpm_solver/` in Stability-AI/stablediffusion.

`callback`, when given, is called after every step with a dict: i (step index), t (UNet timestep of the
step), x (new latents), denoised (the step's x_0 prediction).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sd.errors import SDError

_ALIASES = {"dpm": "dpmpp-2m", "dpmpp_2m": "dpmpp-2m", "dpm-solver": "dpmpp-2m"}

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


class PLMSVPredictionWarning(UserWarning):
    """PLMS was asked to sample a v-prediction model; like the original it treats the output as eps."""


def _check_no_eta(sampler: str, eta: float) -> None:
    if eta != 0.0:
        raise SDError(f"eta applies to the ddim sampler only (got eta={eta} with {sampler}).")


# ---------------------------------------------------------------------------------------------------------
# DDIM / PLMS schedule (ldm/modules/diffusionmodules/util.py: make_ddim_timesteps,
# make_ddim_sampling_parameters)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The original "uniform" DDIM timesteps: c = N // S, range(0, N, c) + 1 (S=50 -> 1, 21, ..., 981).

    If N % S != 0 there can be more than S of them (S=30 -> c=33 -> 31 timesteps), as in the original.
    Where the last one would be N itself (999 % c == 0, e.g. S = 3, 9, 27, 36, 37, 101..111, 251..333) the
    original indexes past the schedule and fails with an IndexError; we drop that one timestep instead
    (S=3 -> 1, 334, 667, as diffusers' "leading" spacing with steps_offset=1).
    """
    c = num_train_timesteps // steps if steps >= 1 else 0
    if c < 2:  # c = 1 would put every timestep 1..N in the schedule, N itself out of range
        raise SDError(
            f"steps must be between 1 and {num_train_timesteps // 2} for the DDIM/PLMS schedule "
            f"of {num_train_timesteps} training timesteps (got {steps})."
        )
    return [t + 1 for t in range(0, num_train_timesteps, c) if t + 1 < num_train_timesteps]


def ddim_schedule(
    alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(timesteps, a_t, a_prev, sigma) per DDIM index, ascending, as the original's make_schedule.

    a_t = ac[tau_i]; a_prev = [ac[0]] + ac[tau_0 .. tau_{n-2}] (the last step lands on ac[0], not 1);
    sigma_i = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).
    """
    ac = alphas_cumprod.detach().to("cpu", torch.float32)  # the model's float32 buffer, as the original
    timesteps = ddim_timesteps(steps, ac.shape[0])
    a_t = [float(ac[t]) for t in timesteps]
    a_prev = [float(ac[0])] + a_t[:-1]
    sigma = [eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)) for a, ap in zip(a_t, a_prev, strict=True)]
    return timesteps, a_t, a_prev, sigma


def _draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) like x, drawn where the original draws it; with a generator, on the generator's device."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)


def _ddim_step(
    x: torch.Tensor,
    e_t: torch.Tensor,
    a_t: float,
    a_prev: float,
    sigma: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Song et al. 2021, eq. 12) -> (x_prev, x0). The original's get_x_prev_and_pred_x0."""
    x0 = (x - math.sqrt(1.0 - a_t) * e_t) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma**2) * e_t
    # The original draws the noise even when sigma == 0. Drawing it keeps a seeded generator's stream in
    # step with the original's (so a later x_T from the same generator is the original's); only a non-zero
    # sigma pays for moving it to x's device.
    noise = _draw_noise(x, generator)
    if sigma != 0.0:
        x_prev = x_prev + sigma * noise.to(x.device, x.dtype)
    return x_prev, x0


def _full(x: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)


def ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021), as ldm's DDIMSampler.

    Walks the `ddim_timesteps` from the largest down (981 -> 1 for S=50); eta > 0 adds the stochastic
    term. Noise is drawn at every step even when sigma = 0, from `generator` if given (deterministic and
    device-independent) else from the global RNG on x's device (the original's `noise_like`).
    """
    timesteps, a_t, a_prev, sigma = ddim_schedule(alphas_cumprod, steps, eta)
    x = x_T
    for i, index in enumerate(reversed(range(len(timesteps)))):
        t = _full(x, timesteps[index], torch.long)
        e_t = model_fn(x, t)
        x, x0 = _ddim_step(x, e_t, a_t[index], a_prev[index], sigma[index], generator)
        if callback is not None:
            callback({"i": i, "t": timesteps[index], "x": x, "denoised": x0})
    return x


def plms(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PLMS (Liu, Ren, Lin, Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds", ICLR 2022).

    As ldm's PLMSSampler (eta = 0, DDIM timesteps): the first step is a pseudo improved Euler step (a
    provisional DDIM step to the next timestep and a second model call there: 2 NFEs, e' = (e_t + e_next)/2);
    then pseudo linear multistep (Adams-Bashforth) of order 2, 3, 4 on the stored raw e_t history. Each
    DDIM update draws (unused, sigma = 0) noise as the original does: pass the run's `generator` to keep
    its stream as the original's.
    """
    _check_no_eta("plms", eta)
    timesteps, a_t, a_prev, _ = ddim_schedule(alphas_cumprod, steps, 0.0)
    time_range = timesteps[::-1]
    n = len(time_range)
    old_eps: list[torch.Tensor] = []
    x = x_T
    for i, step in enumerate(time_range):
        index = n - i - 1
        t = _full(x, step, torch.long)
        e_t = model_fn(x, t)
        if not old_eps:  # pseudo improved Euler
            x_next, _ = _ddim_step(x, e_t, a_t[index], a_prev[index], 0.0, generator)
            t_next = _full(x, time_range[min(i + 1, n - 1)], torch.long)
            e_prime = (e_t + model_fn(x_next, t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, x0 = _ddim_step(x, e_prime, a_t[index], a_prev[index], 0.0, generator)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "denoised": x0})
    return x


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) with the original's NoiseScheduleVP("discrete")


def vp_log_alpha(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log alpha(t) of NoiseScheduleVP("discrete"): piecewise linear through (n+1)/N -> 0.5 ln ac_n.

    Outside [1/N, 1] the end segments are extended linearly, as the original's interpolate_fn. Computed
    on t's device in t's (floating) dtype.
    """
    log_alpha = 0.5 * torch.log(alphas_cumprod.detach().to(t.device, t.dtype))
    n = log_alpha.shape[0]
    grid = torch.arange(1, n + 1, dtype=t.dtype, device=t.device) / n
    k = (torch.searchsorted(grid, t) - 1).clamp(0, n - 2)
    w = (t - grid[k]) / (grid[k + 1] - grid[k])
    return log_alpha[k] + w * (log_alpha[k + 1] - log_alpha[k])


def dpmpp_2m(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", 2022), as the original's DPMSolverSampler: data prediction, multistep order 2, "dpm_solver"
    update, skip_type "time_uniform" (t = linspace(1, 1/N, S+1)), lower_order_final (the last step is first
    order when S < 15). The UNet sees time (t - 1/N) * 1000 as float (999 ... 0). NFE = S. Deterministic:
    `generator` is accepted for the common signature and never drawn from.
    """
    _check_no_eta("dpmpp-2m", eta)
    if steps < 2:
        raise SDError(f"dpmpp-2m needs at least 2 steps (got {steps}), as the original (order 2 multistep).")
    n = alphas_cumprod.shape[0]
    ts = torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64)
    log_alpha = vp_log_alpha(alphas_cumprod, ts)
    alpha = torch.exp(log_alpha).tolist()
    sigma = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    lam = (log_alpha - torch.log(sigma)).tolist()
    sigma = sigma.tolist()
    unet_t = ((ts - 1.0 / n) * 1000.0).tolist()

    def data_prediction(x: torch.Tensor, i: int) -> torch.Tensor:
        eps = model_fn(x, _full(x, unet_t[i], torch.float32))
        return (x - sigma[i] * eps) / alpha[i]

    def first_order(x: torch.Tensor, m: torch.Tensor, i: int) -> torch.Tensor:  # from t_{i-1} to t_i
        h = lam[i] - lam[i - 1]
        return (sigma[i] / sigma[i - 1]) * x - alpha[i] * math.expm1(-h) * m

    def second_order(x: torch.Tensor, m_prev: torch.Tensor, m: torch.Tensor, i: int) -> torch.Tensor:
        h_0 = lam[i - 1] - lam[i - 2]
        h = lam[i] - lam[i - 1]
        d1 = (m - m_prev) / (h_0 / h)
        phi = math.exp(-h) - 1.0
        return (sigma[i] / sigma[i - 1]) * x - alpha[i] * phi * m - 0.5 * alpha[i] * phi * d1

    x = x_T
    m_prev = None
    m = data_prediction(x, 0)
    for i in range(1, steps + 1):
        order = 1 if i == 1 else (min(2, steps + 1 - i) if steps < 15 else 2)
        x = first_order(x, m, i) if order == 1 else second_order(x, m_prev, m, i)
        if callback is not None:
            callback({"i": i - 1, "t": unet_t[i], "x": x, "denoised": m})
        if i < steps:  # the final model value is not needed
            m_prev, m = m, data_prediction(x, i)
    return x


# ---------------------------------------------------------------------------------------------------------
# Model glue: classifier-free guidance and v -> eps


def _alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    """(alpha_t, sigma_t) shaped (B, 1, 1, 1): exact ac[t] at integer t, interpolated (DPM) at float t."""
    if t.dtype in (torch.int64, torch.int32):
        ac = alphas_cumprod.to(like.device, torch.float32)[t.to(like.device)]
        alpha, sigma = ac.sqrt(), (1.0 - ac).sqrt()
    else:  # DPM-Solver's continuous time: t_cont = t / 1000 + 1/N
        n = alphas_cumprod.shape[0]
        log_alpha = vp_log_alpha(alphas_cumprod, t.to(like.device, torch.float32) / 1000.0 + 1.0 / n)
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# The registry and the sampling call

SamplerFn = Callable[..., torch.Tensor]  # (model_fn, x_T, alphas_cumprod, steps, *, eta, generator, callback)


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: the function and what the caller needs to know about it."""

    run: SamplerFn
    model_steps: Callable[[int], int]  # sampler iterations (callback calls) for `steps`
    v_as_eps: bool = False  # the original PLMSSampler treats a v-prediction output as eps


_SAMPLERS: dict[str, Sampler] = {
    "plms": Sampler(plms, lambda steps: len(ddim_timesteps(steps)), v_as_eps=True),
    "ddim": Sampler(ddim, lambda steps: len(ddim_timesteps(steps))),
    "dpmpp-2m": Sampler(dpmpp_2m, lambda steps: steps),
}
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


def resolve_sampler(name: str) -> str:
    """Canonical sampler name ("plms", "ddim", "dpmpp-2m"); "dpm" is accepted for "dpmpp-2m"."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _SAMPLERS:
        raise SDError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} ('dpm' = dpmpp-2m).")
    return canonical


def guided_model_fn(
    model, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float, v_to_eps: bool
) -> ModelFn:
    """model_fn(x, t) -> eps from `model.unet`, with classifier-free guidance and v -> eps (see `sample`)."""
    unet, ac = model.unet, model.alphas_cumprod
    unet_dtype = next(unet.parameters()).dtype
    guided = uncond is not None and guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guided:
            out_u, out_c = unet(torch.cat([x, x]).to(unet_dtype), torch.cat([t, t]), context).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = unet(x.to(unet_dtype), t, context)
        out = out.to(x.dtype)
        if v_to_eps:  # eps = alpha_t * v + sigma_t * x
            alpha, sigma = _alpha_sigma(ac, t, x)
            out = alpha * out + sigma * x
        return out

    return model_fn


def sample(
    model,
    sampler: str,
    steps: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    x_T: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample latents with `model.unet` from x_T (B, 4, h, w): the SD 2.1 txt2img sampling call.

    Classifier-free guidance runs the UNet once on [uncond; cond] (uncond first) and combines the raw
    outputs: out_u + s * (out_c - out_u); it is off when s == 1 or uncond is None. For a v-prediction model
    (model.parameterization == "v") DDIM converts v to eps with the full-schedule ac at the integer
    timestep and DPM-Solver with the interpolated alpha/sigma, as the originals. PLMS does what the original
    PLMSSampler does: it treats the v output as eps (wrong images; a warning says so). The latents stay in
    x_T's dtype; the UNet gets them in its parameter dtype.
    """
    name = resolve_sampler(sampler)
    spec = _SAMPLERS[name]
    v_prediction = model.parameterization == "v"
    if v_prediction and spec.v_as_eps:
        warnings.warn(
            "PLMS with a v-prediction model (e.g. sd21-v): like the original PLMSSampler this treats the "
            "UNet's v output as eps, which gives wrong images. Use the ddim or dpmpp-2m sampler for v "
            "models.",
            PLMSVPredictionWarning,
            stacklevel=2,
        )
    model_fn = guided_model_fn(model, cond, uncond, guidance_scale, v_prediction and not spec.v_as_eps)
    return spec.run(
        model_fn, x_T, model.alphas_cumprod, steps, eta=eta, generator=generator, callback=callback
    )


def num_model_steps(sampler: str, steps: int) -> int:
    """How many sampler iterations (callback calls) `steps` gives: len(ddim_timesteps) or S for DPM."""
    return _SAMPLERS[resolve_sampler(sampler)].model_steps(steps)
