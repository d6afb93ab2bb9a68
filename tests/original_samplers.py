"""Transcriptions of the original SD 2.1 samplers, loop by loop: the independent expectation of test_samplers.

ldm/models/diffusion/{ddim,plms}.py and dpm_solver/{sampler,dpm_solver}.py of Stability-AI/stablediffusion
(float32 buffers, the global RNG, CFG and v handling where the original does it), written from the
original code, not from sd/samplers.py. Reference code, not tests: keep it as the original reads.
"""

from __future__ import annotations

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# The original LatentDiffusion bits the samplers touch


def original_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


class OrigLatentDiffusion:
    def __init__(self, unet, parameterization="eps"):
        ac = original_alphas_cumprod()
        self.unet = unet
        self.parameterization = parameterization
        self.alphas_cumprod = torch.tensor(ac, dtype=torch.float32)
        self.sqrt_alphas_cumprod = torch.tensor(np.sqrt(ac), dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = torch.tensor(np.sqrt(1.0 - ac), dtype=torch.float32)
        self.num_timesteps = 1000

    def apply_model(self, x, t, c):
        return self.unet(x, t, c)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        )


def make_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps, drop_out_of_range=False):
    c = num_ddpm_timesteps // num_ddim_timesteps
    ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    steps_out = ddim_timesteps + 1
    if drop_out_of_range:  # our documented deviation where the original crashes (S = 3, 9, 27, ...)
        steps_out = steps_out[steps_out < num_ddpm_timesteps]
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta):
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


class OrigDDIMSampler:
    """ldm/models/diffusion/ddim.py (DDIMSampler), the parts txt2img uses."""

    def __init__(self, model):
        self.model = model

    def make_schedule(self, S, eta):
        self.ddim_timesteps = make_ddim_timesteps(S, 1000, drop_out_of_range=True)
        ac = self.model.alphas_cumprod.numpy()
        self.ddim_sigmas, self.ddim_alphas, self.ddim_alphas_prev = make_ddim_sampling_parameters(
            ac, self.ddim_timesteps, eta
        )
        self.ddim_sqrt_one_minus_alphas = np.sqrt(1.0 - self.ddim_alphas)

    def sample(self, S, cond, uc, scale, x_T, eta=0.0):
        self.make_schedule(S, eta)
        img = x_T
        b = x_T.shape[0]
        time_range = np.flip(self.ddim_timesteps)
        total_steps = self.ddim_timesteps.shape[0]
        for i, step in enumerate(time_range):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), dtype=torch.long)
            img, _ = self.p_sample_ddim(img, cond, ts, index, uc, scale)
        return img

    def p_sample_ddim(self, x, c, t, index, uc, scale):
        b = x.shape[0]
        if uc is None or scale == 1.0:
            model_output = self.model.apply_model(x, t, c)
        else:
            x_in, t_in, c_in = torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])
            model_uncond, model_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
            model_output = model_uncond + scale * (model_t - model_uncond)
        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, model_output)
        else:
            e_t = model_output
        a_t = torch.full((b, 1, 1, 1), float(self.ddim_alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(self.ddim_alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), float(self.ddim_sigmas[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(self.ddim_sqrt_one_minus_alphas[index]))
        if self.model.parameterization != "v":
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        else:
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0


class OrigPLMSSampler(OrigDDIMSampler):
    """ldm/models/diffusion/plms.py (PLMSSampler): model output always used as eps."""

    def sample(self, S, cond, uc, scale, x_T, eta=0.0):
        assert eta == 0
        self.make_schedule(S, 0.0)
        img = x_T
        b = x_T.shape[0]
        time_range = np.flip(self.ddim_timesteps)
        total_steps = self.ddim_timesteps.shape[0]
        old_eps = []
        for i, step in enumerate(time_range):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), dtype=torch.long)
            ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
            img, _, e_t = self.p_sample_plms(img, cond, ts, index, uc, scale, old_eps, ts_next)
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
        return img

    def p_sample_plms(self, x, c, t, index, uc, scale, old_eps, t_next):
        b = x.shape[0]

        def get_model_output(x, t):
            if uc is None or scale == 1.0:
                e_t = self.model.apply_model(x, t, c)
            else:
                x_in, t_in, c_in = torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])
                e_t_uncond, e_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
                e_t = e_t_uncond + scale * (e_t - e_t_uncond)
            return e_t

        def get_x_prev_and_pred_x0(e_t, index):
            a_t = torch.full((b, 1, 1, 1), float(self.ddim_alphas[index]))
            a_prev = torch.full((b, 1, 1, 1), float(self.ddim_alphas_prev[index]))
            sigma_t = torch.full((b, 1, 1, 1), float(self.ddim_sigmas[index]))
            sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(self.ddim_sqrt_one_minus_alphas[index]))
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
            noise = sigma_t * torch.randn(x.shape)
            x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
            return x_prev, pred_x0

        e_t = get_model_output(x, t)
        if len(old_eps) == 0:
            x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = get_model_output(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t_prime, index)
        return x_prev, pred_x0, e_t


def interpolate_fn(x, xp, yp):
    """dpm_solver.py interpolate_fn: piecewise linear with linear extrapolation (x: (N, C), xp/yp: (C, K))."""
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(1),
        torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx),
    )
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(0),
        torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx),
    )
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


class OrigNoiseScheduleVP:
    def __init__(self, alphas_cumprod):
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_N = len(log_alphas)
        self.T = 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].reshape((1, -1))
        self.log_alpha_array = log_alphas.reshape((1, -1))

    def marginal_log_mean_coeff(self, t):
        return interpolate_fn(t.reshape((-1, 1)), self.t_array, self.log_alpha_array).reshape(-1)

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std


def orig_dpm_solver_sample(model, S, cond, uc, scale, x_T):
    """dpm_solver/sampler.py DPMSolverSampler.sample + DPM_Solver.sample(multistep, order 2, time_uniform)."""
    ns = OrigNoiseScheduleVP(model.alphas_cumprod)
    model_type = {"eps": "noise", "v": "v"}[model.parameterization]
    dims = x_T.dim()

    def expand_dims(v, dims):
        return v[(...,) + (None,) * (dims - 1)]

    def noise_pred_fn(x, t_continuous, cond):
        if t_continuous.reshape((-1,)).shape[0] == 1:
            t_continuous = t_continuous.expand(x.shape[0])
        t_input = (t_continuous - 1.0 / ns.total_N) * 1000.0
        output = model.apply_model(x, t_input, cond)
        if model_type == "noise":
            return output
        alpha_t, sigma_t = ns.marginal_alpha(t_continuous), ns.marginal_std(t_continuous)
        return expand_dims(alpha_t, dims) * output + expand_dims(sigma_t, dims) * x

    def model_fn(x, t_continuous):
        if scale == 1.0 or uc is None:
            return noise_pred_fn(x, t_continuous, cond)
        x_in, t_in, c_in = torch.cat([x] * 2), torch.cat([t_continuous] * 2), torch.cat([uc, cond])
        noise_uncond, noise = noise_pred_fn(x_in, t_in, c_in).chunk(2)
        return noise_uncond + scale * (noise - noise_uncond)

    def data_prediction_fn(x, t):
        noise = model_fn(x, t)
        alpha_t, sigma_t = ns.marginal_alpha(t), ns.marginal_std(t)
        return (x - expand_dims(sigma_t, dims) * noise) / expand_dims(alpha_t, dims)

    def dpm_solver_first_update(x, s, t, model_s):
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        alpha_t = torch.exp(log_alpha_t)
        phi_1 = torch.expm1(-h)
        return expand_dims(sigma_t / sigma_s, dims) * x - expand_dims(alpha_t * phi_1, dims) * model_s

    def multistep_second_update(x, model_prev_list, t_prev_list, t):
        model_prev_1, model_prev_0 = model_prev_list
        t_prev_1, t_prev_0 = t_prev_list
        lambda_prev_1, lambda_prev_0, lambda_t = (
            ns.marginal_lambda(t_prev_1),
            ns.marginal_lambda(t_prev_0),
            ns.marginal_lambda(t),
        )
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        h_0 = lambda_prev_0 - lambda_prev_1
        h = lambda_t - lambda_prev_0
        r0 = h_0 / h
        D1_0 = expand_dims(1.0 / r0, dims) * (model_prev_0 - model_prev_1)
        return (
            expand_dims(sigma_t / sigma_prev_0, dims) * x
            - expand_dims(alpha_t * (torch.exp(-h) - 1.0), dims) * model_prev_0
            - 0.5 * expand_dims(alpha_t * (torch.exp(-h) - 1.0), dims) * D1_0
        )

    def multistep_update(x, model_prev_list, t_prev_list, t, order):
        if order == 1:
            return dpm_solver_first_update(x, t_prev_list[-1], t, model_prev_list[-1])
        return multistep_second_update(x, model_prev_list, t_prev_list, t)

    order, steps, x = 2, S, x_T
    t_0, t_T = 1.0 / ns.total_N, ns.T
    timesteps = torch.linspace(t_T, t_0, steps + 1)
    vec_t = timesteps[0].expand(x.shape[0])
    model_prev_list = [data_prediction_fn(x, vec_t)]
    t_prev_list = [vec_t]
    for init_order in range(1, order):
        vec_t = timesteps[init_order].expand(x.shape[0])
        x = multistep_update(x, model_prev_list, t_prev_list, vec_t, init_order)
        model_prev_list.append(data_prediction_fn(x, vec_t))
        t_prev_list.append(vec_t)
    for step in range(order, steps + 1):
        vec_t = timesteps[step].expand(x.shape[0])
        step_order = min(order, steps + 1 - step) if steps < 15 else order
        x = multistep_update(x, model_prev_list, t_prev_list, vec_t, step_order)
        for i in range(order - 1):
            t_prev_list[i] = t_prev_list[i + 1]
            model_prev_list[i] = model_prev_list[i + 1]
        t_prev_list[-1] = vec_t
        if step < steps:
            model_prev_list[-1] = data_prediction_fn(x, vec_t)
    return x


def orig_sample(model, sampler, S, cond, uc, scale, x_T, eta=0.0):
    if sampler == "ddim":
        return OrigDDIMSampler(model).sample(S, cond, uc, scale, x_T, eta)
    if sampler == "plms":
        return OrigPLMSSampler(model).sample(S, cond, uc, scale, x_T, eta)
    return orig_dpm_solver_sample(model, S, cond, uc, scale, x_T)
