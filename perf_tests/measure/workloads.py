"""What each case kind runs, on which inputs, and the models it runs on (built once, shared).

Every kind is a function ``make_<kind>(model, case, profile, device) -> fn`` returning a zero-argument
callable that does the work and returns its output (compared with the reference). Inputs are made once,
from fixed seeds, outside the timed call:

  txt2img      text encoding of the prompt and of "" (classifier-free guidance), the sampling loop (PLMS,
               guidance 9, the profile's steps) from a fixed x_T, VAE decode; output: image in [0, 1]
  unet-step    one UNet call on the [uncond; cond] batch (2 x batch) at t=500
  vae-decode   one VAE decode of batch latents
  text-encode  encode_text of batch prompts + batch empty prompts (what one txt2img call encodes)
  attention-*  one attend(q, k, v) call of the backend at SD 2.1's shapes (2 x batch, heads of 64)

Models are built with the case's attention backend for the UNet and no ``vae_attention``: sd picks the
VAE's kernel (its single head is 512 wide, beyond the flash kernels), and ``extra_info`` records both
(``attention_used``, ``vae_attention_used``). Models are cached by ``Case.model_key()``; the reference
model (original attention, eager, fp32) is kept for the whole session, on the CPU whenever it is not
running, so that it never counts in another case's device memory; any other model is kept until a case
needs a different one (cases are sorted so each model is built once). Compiled cases share the compiled
model of their key, but each compiles it afresh (perf_tests.measure.timing.compile_cache_state).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from perf_tests.measure.cases import ATTENTION_SHAPES, PROFILES, Case, Profile
from sd.attention import resolve_attention
from sd.compile import compile_fn, compile_model
from sd.model import load_model
from sd.precision import autocast_context, precision_dtype
from sd.samplers import sample

UNET_T = 500  # a mid-schedule timestep for the single-step case
SEEDS = {"x_T": 1, "unet": 2, "vae": 3, "attention": 4}


def _randn(shape, seed: int, device: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # CPU generator: same numbers on every device
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _param_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------
# Kinds


def make_txt2img(model, case: Case, profile: Profile, device: str) -> Callable:
    bs, h, w = case.batch_size, case.height // 8, case.width // 8
    prompts, empty = [profile.prompt] * bs, [""] * bs
    x_T = _randn((bs, 4, h, w), SEEDS["x_T"], device)  # float32, as the original script

    def fn():
        with torch.no_grad(), autocast_context(case.precision, device):
            cond = model.encode_text(prompts)
            uncond = model.encode_text(empty)
            z = sample(model, profile.sampler, steps=case.steps, cond=cond, uncond=uncond,
                       guidance_scale=profile.guidance_scale, x_T=x_T)
            return model.decode_latents(z).float()  # (B, 3, H, W) in [0, 1], as txt2img before uint8

    return fn


def make_unet_step(model, case: Case, profile: Profile, device: str) -> Callable:
    n, h, w = 2 * case.batch_size, case.height // 8, case.width // 8
    dtype = _param_dtype(model.unet)
    x = _randn((n, 4, h, w), SEEDS["unet"], device, dtype)
    t = torch.full((n,), UNET_T, device=device, dtype=torch.long)
    context = _randn((n, 77, model.config.unet.context_dim), SEEDS["unet"] + 100, device, dtype)

    def fn():
        with torch.no_grad(), autocast_context(case.precision, device):
            return model.unet(x, t, context)

    return fn


def make_vae_decode(model, case: Case, profile: Profile, device: str) -> Callable:
    z = _randn((case.batch_size, 4, case.height // 8, case.width // 8), SEEDS["vae"], device)

    def fn():
        with torch.no_grad(), autocast_context(case.precision, device):
            return model.decode_latents(z)

    return fn


def make_text_encode(model, case: Case, profile: Profile, device: str) -> Callable:
    prompts = [profile.prompt] * case.batch_size + [""] * case.batch_size

    def fn():
        with torch.no_grad(), autocast_context(case.precision, device):
            return model.encode_text(prompts)

    return fn


def attention_inputs(case: Case, profile: Profile, device: str) -> tuple:
    q_tokens, kv_tokens, level = ATTENTION_SHAPES[case.kind]
    n, heads = 2 * case.batch_size, profile.heads[level]
    dtype = precision_dtype(case.precision)
    q = _randn((n, heads, q_tokens, 64), SEEDS["attention"], device, dtype)  # (B, heads, N, d)
    k = _randn((n, heads, kv_tokens, 64), SEEDS["attention"] + 1, device, dtype)
    v = _randn((n, heads, kv_tokens, 64), SEEDS["attention"] + 2, device, dtype)
    return q, k, v


def make_attention(attend: Callable, case: Case, profile: Profile, device: str) -> Callable:
    q, k, v = attention_inputs(case, profile, device)

    def fn():
        with torch.no_grad(), autocast_context(case.precision, device):
            return attend(q, k, v)

    return fn


MAKERS = {
    "txt2img": make_txt2img,
    "unet-step": make_unet_step,
    "vae-decode": make_vae_decode,
    "text-encode": make_text_encode,
}


KINDS_WITH_VAE = ("txt2img", "vae-decode")


def needs_model(kind: str) -> bool:
    return kind in MAKERS


# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Built:
    """A model (or an attention kernel) ready to run, with what its building cost."""

    key: tuple
    model: object  # sd model, or the attend callable for attention kinds
    attention_used: str
    build_s: float
    vae_attention_used: str | None = None  # the VAE's kernel (sd's choice), for the kinds that run the VAE
    compile_setup_s: float | None = None  # sd.compile_model / torch.compile call itself (lazy: small)
    compiled_parts: list | None = None


def _load_options(case: Case) -> dict:
    """load_model keyword arguments for the case's memory format and projections."""
    options = {}
    if case.memory_format == "channels-last":
        options["channels_last"] = True
    if case.projections == "fused":
        options["fuse_projections"] = True
    return options


class ModelCache:
    """Session cache: the reference model for the whole run (on the CPU between its uses), plus the most
    recent other model."""

    def __init__(self, device: str, ckpt: str | None = None, compile_vae: bool = False):
        self.device = device
        self.ckpt = ckpt
        # With compile_vae, compiled models get sd.compile_model(..., vae=True): the vae-decode kind measures
        # the compiled decoder and txt2img runs it too; else only the UNet is compiled (as in the study).
        self.compile_vae = compile_vae
        self._reference: dict[str, Built] = {}  # profile -> reference model
        self._current: Built | None = None
        self._kernels: dict[tuple, Built] = {}

    def model(self, case: Case) -> Built:
        key = case.model_key()
        if not case.optimized:
            if case.profile not in self._reference:
                self._reference[case.profile] = self._build(case)
            built = self._reference[case.profile]
            built.model.to(self.device)  # back from park_reference (a no-op when it is there)
            return built
        self.park_reference()
        if self._current is not None and self._current.key == key:
            return self._current
        self.release()
        self._current = self._build(case)
        return self._current

    def park_reference(self) -> None:
        """Move the reference models off the accelerator: a case's peak memory must not include them."""
        if torch.device(self.device).type == "cpu":
            return
        for built in self._reference.values():
            built.model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()

    def _build(self, case: Case) -> Built:
        t0 = time.perf_counter()
        model = load_model(PROFILES[case.profile].preset, self.ckpt, attention=case.attention,
                           device=self.device, dtype=precision_dtype(case.precision), **_load_options(case))
        model.eval()
        build_s = time.perf_counter() - t0
        built = Built(case.model_key(), model, model.attention, build_s,
                      vae_attention_used=getattr(model, "vae_attention", None))
        if case.compiled:
            t0 = time.perf_counter()
            built.model = compile_model(model, case.compile, vae=self.compile_vae)
            built.compiled_parts = ["unet", "vae-decoder"] if self.compile_vae else ["unet"]
            built.compile_setup_s = time.perf_counter() - t0
        return built

    def kernel(self, case: Case) -> Built:
        """The attend function of the case's backend (compiled with torch.compile when asked)."""
        key = (case.attention, case.compile, case.precision)
        if key not in self._kernels:
            self.release()  # attention cases run after all model cases (run_order): free the last model
            self.park_reference()
            t0 = time.perf_counter()
            attend = resolve_attention(case.attention, self.device, precision_dtype(case.precision))
            parts = None
            if case.compiled:
                attend, parts = compile_fn(attend, case.compile), ["attention"]
            self._kernels[key] = Built(key, attend, case.attention, time.perf_counter() - t0,
                                       compiled_parts=parts)
        return self._kernels[key]

    def release(self) -> None:
        """Drop the current non-reference model."""
        if self._current is None:
            return
        self._current = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_workload(cache: ModelCache, case: Case) -> tuple[Callable, Built]:
    profile = PROFILES[case.profile]
    if needs_model(case.kind):
        built = cache.model(case)
        fn = MAKERS[case.kind](built.model, case, profile, cache.device)
        if case.kind not in KINDS_WITH_VAE:
            built = dataclasses.replace(built, vae_attention_used=None)
        return fn, built
    built = cache.kernel(case)
    return make_attention(built.model, case, profile, cache.device), built
