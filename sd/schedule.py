"""The DDPM noise schedule of SD 2.1 and its 12 registered buffers.

Reproduces `make_beta_schedule("linear", ...)` (ldm/modules/diffusionmodules/util.py) and
`DDPM.register_schedule` (ldm/models/diffusion/ddpm.py): betas are the squares of a float64 linspace
between sqrt(linear_start) and sqrt(linear_end) ("scaled linear"), every derived quantity is computed in
float64 and stored as float32.
The buffers are top-level in the original state dict (keys "betas", "alphas_cumprod", ...), in this order.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_betas(linear_start: float, linear_end: float, timesteps: int) -> Tensor:
    """The "linear" schedule of the original: linspace of square roots, squared (float64, (T,))."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def schedule_buffers(linear_start: float, linear_end: float, timesteps: int) -> dict[str, Tensor]:
    """The 12 persistent schedule buffers of DDPM.register_schedule, float32 (T,), on the CPU."""
    betas = make_betas(linear_start, linear_end, timesteps)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    # v_posterior = 0 in SD 2.1: the posterior variance is the "beta tilde" of DDPM.
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # posterior_variance[0] is 0: the original clips before the log.
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    assert tuple(values) == SCHEDULE_BUFFERS
    return {name: value.to(torch.float32) for name, value in values.items()}
