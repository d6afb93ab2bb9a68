"""Our UNet forward against diffusers' `UNet2DConditionModel`, rung by rung, side by side in one process.

The speed target: at every rung of the optimisation ladder that runs on a device, our UNet
takes at most 1.00x the time of diffusers' with the same settings. Both sides get the same weights
(diffusers' own LDM-checkpoint converters applied to our state dict, as the oracle in tests/conftest.py),
the same input, SDPA attention (ours `attention="sdpa"`, theirs `AttnProcessor2_0`, or
`FusedAttnProcessor2_0` once fused) and, per rung, the same settings:

  compile         eager | compile    (both through sd.compile.compile_fn: same Inductor options)
  memory format   contiguous | channels-last   (the UNet's weights; the input stays contiguous)
  projections     separate | fused   (theirs: fuse_qkv_projections(); ours: load_model(fuse_projections=True)
                                      where this tree has that keyword, else "not available in this tree")
  precision       fp32 on a CPU; fp16 and bf16 on CUDA

Timing is interleaved call by call (ours, theirs, theirs, ours, ...: the order inside a pair alternates,
so neither side always runs on a cache the other warmed), each call synchronised, after explicit warm-up
calls (the first of which compiles on a compiled rung; its time is kept apart, as `first_call_s` in the
JSON). Other load on a shared machine then slows both sides of a pair alike, so the *ratio* stays fair
even when the absolute times do not. Per rung the report gives both medians and the ratio ours/theirs as
the median of the paired per-call ratios with a percentile bootstrap interval; the target is ratio <= 1.00.

    python -m perf_tests parity --preset tiny --batch-size 2 --rounds 20 --format markdown

Exit status: 0 when no rung is slower than diffusers beyond its interval and every output matches;
1 when a rung is (interval wholly above 1) or its outputs differ; 2 on bad input or an error.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import gc
import importlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from perf_tests.errors import InputError
from perf_tests.measure.timing import sync
from perf_tests.report.tabular import markdown_table, text_table
from sd.capabilities import has_compile
from sd.compile import compile_fn, compile_model
from sd.config import ModelConfig, load_config
from sd.model import StableDiffusion, load_model
from sd.precision import precision_dtype

COMPILE = ("eager", "compile")
MEMORY_FORMATS = ("contiguous", "channels-last")
PROJECTIONS = ("separate", "fused")
TARGET_RATIO = 1.00
TIMESTEP = 500.0  # mid-schedule, as the suite's unet-step
SEEDS = {"x": 2, "context": 102}
# max|ours - theirs| <= atol + rtol_of_max * max|theirs|, per precision (fp32: rounding of a different
# summation order; compiled kernels reorder sums too).
TOLERANCE = {"fp32": (1e-5, 1e-3), "fp16": (1e-3, 2e-2), "bf16": (1e-2, 5e-2)}


def median_ratio_interval(log_ratios: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): the median of paired log ratios and its percentile bootstrap interval (seeded,
    so a report is reproducible from its samples); nan bounds with fewer than two pairs."""
    logs = np.asarray(log_ratios, dtype=float)
    point = math.exp(float(np.median(logs)))
    if logs.size < 2:
        return point, math.nan, math.nan
    if np.ptp(logs) == 0:
        return point, point, point
    from scipy import stats as sps  # here, not at import: scipy.stats is 0.6 s of every command's start

    ci = sps.bootstrap((logs,), np.median, confidence_level=confidence, n_resamples=resamples,
                       method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    return point, math.exp(ci.low), math.exp(ci.high)


class ParityError(InputError):
    """Bad input or a missing requirement: one `error:` paragraph, exit 2."""


@dataclass(frozen=True)
class Rung:
    """One step of the ladder; its string is the id used by --rungs and in every report."""

    compile: str
    memory_format: str
    projections: str
    precision: str

    def __str__(self) -> str:
        return f"{self.compile}-{self.memory_format}-{self.projections}-{self.precision}"


def device_precisions(device: torch.device) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("fp32",)
    return ("fp16", "bf16") if torch.cuda.is_bf16_supported() else ("fp16",)


def all_rungs(device: torch.device) -> list[Rung]:
    return [
        Rung(c, m, p, dt)
        for dt in device_precisions(device)
        for c in COMPILE
        for m in MEMORY_FORMATS
        for p in PROJECTIONS
    ]


def select_rungs(device: torch.device, patterns: Sequence[str] | None) -> list[Rung]:
    """The rungs whose id matches any of the fnmatch `patterns` (all when None), in ladder order."""
    rungs = all_rungs(device)
    if not patterns:
        return rungs
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(str(r), p) for r in rungs)]
    if unmatched:
        raise ParityError(
            f"--rungs {', '.join(unmatched)} matches no rung on {device}. Rung ids are "
            f"<compile>-<memory format>-<projections>-<precision>, e.g. {rungs[0]}; patterns such as "
            f"'eager-*' work. Rungs here: {', '.join(map(str, rungs))}."
        )
    return [r for r in rungs if any(fnmatch.fnmatchcase(str(r), p) for p in patterns)]


def unavailable(rung: Rung) -> str | None:
    """Why `rung` cannot be measured with this tree and this PyTorch, or None."""
    if rung.compile != "eager" and not has_compile():
        return f"torch.compile is not available in PyTorch {torch.__version__}"
    return None


# ---------------------------------------------------------------------------------------------------------
# The two models


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise ParityError(
            f"the parity harness compares with diffusers, which does not import here ({exc}). Use a "
            "PyTorch 2 environment with the oracle extra (`pip install -e .[oracle]`; nox's tests env has "
            "it)."
        ) from None


def _ldm_original(config: ModelConfig) -> dict:
    """The LDM YAML as a dict, with the UNet parameters taken from `config` (it may be a cut-down copy
    of the file's config, as the tests' micro config is)."""
    from omegaconf import OmegaConf

    original = OmegaConf.to_container(OmegaConf.load(config.source))
    params = original["model"]["params"]["unet_config"]["params"]
    for f in dataclasses.fields(config.unet):
        value = getattr(config.unet, f.name)
        params[f.name] = list(value) if isinstance(value, tuple) else value
    return original


def diffusers_unet(model: StableDiffusion) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with `model`'s UNet weights (fp32, CPU, eval, no grad), configured
    and converted by diffusers' own single-file LDM utilities."""
    diffusers = _diffusers()
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {k: v.float().cpu() for k, v in model.state_dict().items() if k.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there; it only sets sample_size
        unet_config = sfu.create_unet_diffusers_config_from_ldm(
            _ldm_original(model.config), checkpoint, image_size=model.config.default_size
        )
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    return unet.eval().requires_grad_(False)


def _build_ours(config: ModelConfig, rung: Rung, device: torch.device, seed: int) -> tuple[Callable, str]:
    kwargs = {"fuse_projections": True} if rung.projections == "fused" else {}
    model = load_model(
        config,
        attention="sdpa",
        device=device,
        dtype=precision_dtype(rung.precision),
        seed=seed,
        channels_last=rung.memory_format == "channels-last",
        **kwargs,
    )
    if rung.compile != "eager":
        compile_model(model, rung.compile)
    unet = model.unet
    return (lambda x, t, c: unet(x, t, c)), model.attention


def _build_theirs(reference: torch.nn.Module, rung: Rung, device: torch.device) -> tuple[Callable, str]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = copy.deepcopy(reference).to(device)
    if rung.precision != "fp32":
        unet.to(precision_dtype(rung.precision))  # all of it, as ours: no module kept in fp32
    unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default on PyTorch 2, said explicitly
    if rung.projections == "fused":
        unet.fuse_qkv_projections()  # and FusedAttnProcessor2_0
    if rung.memory_format == "channels-last":
        unet.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unet(x, t, c, return_dict=False)[0]

    if rung.compile != "eager":
        forward = compile_fn(forward, rung.compile)  # our builder: the same Inductor options as ours
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return forward, ",".join(processors)


# ---------------------------------------------------------------------------------------------------------
# Statistics


def ratio_interval(ours: Sequence[float], theirs: Sequence[float], confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): the median of the paired per-call ratios ours/theirs and its percentile
    bootstrap interval (seeded, so a report is reproducible from its samples).

    Each pair ran back to back, so load that drifts over the run cancels in its ratio. Load that comes in
    bursts (other jobs on a shared CPU) hits one call of a pair and leaves a heavy tail of log ratios,
    which would drag a mean and widen a t interval; the median ignores it.
    """
    return median_ratio_interval([math.log(o / t) for o, t in zip(ours, theirs, strict=True)], confidence,
                                 resamples, seed)


def verdict(ratio: float, low: float, high: float, target: float = TARGET_RATIO) -> str:
    """"pass"/"fail" against ratio <= target; ", straddles 1" when the interval does not decide it."""
    point = "pass" if ratio <= target else "fail"
    if math.isnan(low) or low <= target < high:
        return f"{point}, straddles {target:g}"
    return point


# ---------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class RungResult:
    rung: str
    status: str  # "measured" | "unavailable" | "wrong-output" | "error"
    reason: str | None = None
    ours_s: list[float] = field(default_factory=list)  # per-call seconds, in round order
    theirs_s: list[float] = field(default_factory=list)
    first_call_s: dict[str, float] = field(default_factory=dict)  # includes compilation on compiled rungs
    max_abs_error: float | None = None
    output_scale: float | None = None  # max |theirs|
    outputs_match: bool | None = None
    ours_attention: str | None = None
    theirs_attention: str | None = None
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    verdict: str | None = None

    @property
    def ours_median_s(self) -> float | None:
        return statistics.median(self.ours_s) if self.ours_s else None

    @property
    def theirs_median_s(self) -> float | None:
        return statistics.median(self.theirs_s) if self.theirs_s else None


def _timed(fn: Callable, args: tuple, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def measure_rung(
    rung: Rung,
    config: ModelConfig,
    reference: torch.nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    device: torch.device,
    rounds: int,
    warmup: int,
    seed: int,
) -> RungResult:
    result = RungResult(str(rung), "measured")
    ours, result.ours_attention = _build_ours(config, rung, device, seed)
    theirs, result.theirs_attention = _build_theirs(reference, rung, device)
    dtype = precision_dtype(rung.precision)
    x, t, context = inputs
    args = (x.to(device, dtype), t.to(device), context.to(device, dtype))  # t stays float32
    sides = {"ours": ours, "theirs": theirs}
    with torch.no_grad():
        outputs = {}
        for i in range(max(warmup, 1)):  # explicit warm-up; the first call compiles on compiled rungs
            for name in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                seconds, outputs[name] = _timed(sides[name], args, device)
                result.first_call_s.setdefault(name, seconds)
        diff = (outputs["ours"].float() - outputs["theirs"].float()).abs().max().item()
        scale = outputs["theirs"].float().abs().max().item()
        atol, rtol_of_max = TOLERANCE[rung.precision]
        result.max_abs_error, result.output_scale = diff, scale
        result.outputs_match = diff <= atol + rtol_of_max * scale
        del outputs
        for i in range(rounds):
            for name in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                seconds, _ = _timed(sides[name], args, device)
                getattr(result, f"{name}_s").append(seconds)
    result.ratio, result.ratio_low, result.ratio_high = ratio_interval(result.ours_s, result.theirs_s)
    result.verdict = verdict(result.ratio, result.ratio_low, result.ratio_high)
    if not result.outputs_match:
        result.status, result.verdict = "wrong-output", "fail, outputs differ"
        result.reason = (f"max abs error {diff:.3g} (theirs' max {scale:.3g}) above the {rung.precision} "
                         "tolerance")
    return result


def make_inputs(config: ModelConfig, batch_size: int, latent_side: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, context) in fp32 on the CPU from fixed seeds: (B, 4, h, w) latents, a float32 (B,) timestep,
    (B, 77, context_dim) text context."""
    side = latent_side or config.default_size // 8
    x = torch.randn((batch_size, config.unet.in_channels, side, side),
                    generator=torch.Generator().manual_seed(SEEDS["x"]))
    context = torch.randn((batch_size, config.text.max_length, config.unet.context_dim),
                          generator=torch.Generator().manual_seed(SEEDS["context"]))
    return x, torch.full((batch_size,), TIMESTEP), context


@dataclass
class ParityReport:
    settings: dict
    results: list[RungResult]

    @property
    def exit_code(self) -> int:
        bad = [r for r in self.results if r.status in ("wrong-output", "error") or r.verdict == "fail"]
        return 1 if bad else 0


def run_parity(
    config_or_preset: str | ModelConfig,
    *,
    batch_size: int = 2,
    rounds: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    rungs: Sequence[str] | None = None,
    seed: int = 0,
    latent_side: int | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> ParityReport:
    """Measure every selected rung (see the module docstring); rungs that cannot run are reported with
    the reason. Raises ParityError when diffusers is missing or --rungs matches nothing."""
    if rounds < 2:
        raise ParityError(f"--rounds {rounds}: an interval needs at least 2 rounds (15-30 give a tight one).")
    device_ = torch.device(device)
    selected = select_rungs(device_, rungs)
    config = config_or_preset if isinstance(config_or_preset, ModelConfig) else load_config(config_or_preset)
    diffusers = _diffusers()
    inputs = make_inputs(config, batch_size, latent_side)
    reference = diffusers_unet(load_model(config, seed=seed))  # CPU fp32 weights, copied per rung
    settings = {
        "preset": config.name,
        "device": str(device_),
        "batch_size": batch_size,
        "latent_shape": list(inputs[0].shape),
        "rounds": rounds,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "target_ratio": TARGET_RATIO,
    }
    results = []
    for rung in selected:
        reason = unavailable(rung)
        if reason is not None:
            results.append(RungResult(str(rung), "unavailable", reason))
            log(f"{rung}: {reason}")
            continue
        log(f"{rung}: measuring {rounds} rounds")
        try:
            results.append(measure_rung(rung, config, reference, inputs, device_, rounds, warmup, seed))
        except Exception as exc:  # one rung's failure (a compile error, OOM) is reported, the rest still run
            results.append(RungResult(str(rung), "error", f"{type(exc).__name__}: {exc}".splitlines()[0]))
        finally:
            if rung.compile != "eager":
                torch._dynamo.reset()  # the next rung compiles afresh, within dynamo's cache limit
            gc.collect()
        log(f"{rung}: {results[-1].verdict or results[-1].reason}")
    return ParityReport(settings, results)


# ---------------------------------------------------------------------------------------------------------
# Reports


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f}"


def _row(r: RungResult) -> list[str]:
    if r.status in ("unavailable", "error"):
        return [r.rung, "", "", "", "", f"{r.status}: {r.reason}"]
    interval = f"{r.ratio:.3f} [{r.ratio_low:.3f}, {r.ratio_high:.3f}]"
    return [r.rung, _ms(r.ours_median_s), _ms(r.theirs_median_s), interval, f"{r.max_abs_error:.1e}",
            r.verdict]


HEADER = ["rung", "ours ms", "diffusers ms", "ours/diffusers [95% CI]", "max abs err", "verdict"]


def _preamble(s: dict) -> list[str]:
    return [
        f"UNet forward, ours vs diffusers {s['diffusers']} UNet2DConditionModel, same weights and input: "
        f"{s['preset']}, latents {'x'.join(map(str, s['latent_shape']))}, {s['device']}, "
        f"{s['threads']} thread(s), torch {s['torch']}.",
        f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up calls per side; medians per call; "
        "ratio = median of the paired per-call ratios, bootstrap interval; target ratio <= "
        f"{s['target_ratio']:.2f}.",
    ]


def format_report(report: ParityReport, fmt: str) -> str:
    if fmt == "json":
        rows = []
        for r in report.results:
            row = dataclasses.asdict(r)
            row.update(ours_median_s=r.ours_median_s, theirs_median_s=r.theirs_median_s)
            rows.append(row)
        return json.dumps({"settings": report.settings, "rungs": rows}, indent=2) + "\n"
    rows = [_row(r) for r in report.results]
    if fmt == "markdown":
        lines = [" ".join(_preamble(report.settings)), "", *markdown_table(HEADER, rows)]
        return "\n".join(lines) + "\n"
    lines = [*_preamble(report.settings), "", *text_table(HEADER, rows, rule=False)]
    return "\n".join(lines) + "\n"
