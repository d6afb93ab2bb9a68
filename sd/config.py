"""Model configuration: the original LDM YAML read into frozen dataclasses.

Reproduces the configuration side of SD 2.1 (`configs/stable-diffusion/v2-inference.yaml` and
`v2-inference-v.yaml` of Stability-AI/stablediffusion, shipped verbatim as package data). The YAML is read
with omegaconf; every `target:` string is checked against the class this package implements for it and
is never imported. Parameters that would change the architecture away from SD 2.1 (and which this package
does not implement) must keep their SD 2.1 value, unknown keys are refused, and training-only keys are
ignored. Presets: "sd21-base", "sd21-v" and "tiny" (same structure at small widths, for CPUs and tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sd.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
_PRESET_FILES = {"sd21-base": "v2-inference.yaml", "sd21-v": "v2-inference-v.yaml", "tiny": "tiny.yaml"}
PRESETS: tuple[str, ...] = tuple(_PRESET_FILES)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    num_head_channels: int
    transformer_depth: int
    context_dim: int
    use_linear_in_transformer: bool
    # Recorded only: our dtype follows load_model(dtype=...) and autocast. The original's use_fp16 casts the
    # UNet's input to fp16 but not its weights (openaimodel.py UNetModel), so it only works under autocast.
    use_fp16: bool


@dataclass(frozen=True)
class VAEConfig:
    embed_dim: int
    z_channels: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    double_z: bool
    resolution: int
    attn_resolutions: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class TextEncoderConfig:
    arch: str  # an open_clip model-config name (open_clip.get_model_config)
    layer: str  # "penultimate" (SD 2.1) or "last"
    max_length: int = 77


@dataclass(frozen=True)
class ModelConfig:
    name: str
    parameterization: str  # "eps" | "v"
    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float
    channels: int
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    default_size: int  # output side in pixels used when height/width are not given
    source: str  # the YAML file this came from


# Expected `target:` per section (checked, never imported).
TARGETS = {
    "model": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet_config": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "first_stage_config": "ldm.models.autoencoder.AutoencoderKL",
    "cond_stage_config": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "lossconfig": "torch.nn.Identity",
}

# Per section: the parameters read here, the ones that must keep the value SD 2.1 uses (the other values
# are not implemented), and those with no effect on inference (ignored). Anything else is an unknown key.
_READ: dict[str, set[str]] = {
    "model": set(
        "parameterization linear_start linear_end timesteps scale_factor channels image_size unet_config "
        "first_stage_config cond_stage_config".split()
    ),
    "unet_config": {f.name for f in dataclasses.fields(UNetConfig)},
    "first_stage_config": {"embed_dim", "ddconfig", "lossconfig"},
    "ddconfig": {f.name for f in dataclasses.fields(VAEConfig)} - {"embed_dim"},
    "cond_stage_config": {"arch", "layer", "max_length"},
}
# fmt: off
_FIXED: dict[str, dict[str, Any]] = {
    "model": {"beta_schedule": "linear", "conditioning_key": "crossattn", "scale_by_std": False,
              "v_posterior": 0.0, "given_betas": None, "cond_stage_forward": None},
    "unet_config": {"dims": 2, "dropout": 0, "conv_resample": True, "num_classes": None,
                    "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
                    "use_spatial_transformer": True, "disable_self_attentions": None,
                    "num_attention_blocks": None, "disable_middle_self_attn": False, "adm_in_channels": None,
                    "num_heads": -1, "num_heads_upsample": -1, "n_embed": None},
    "ddconfig": {"attn_type": "vanilla", "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False,
                 "use_linear_attn": False},
}
# fmt: on
_IGNORED: dict[str, set[str]] = {
    "model": set(
        "num_timesteps_cond log_every_t first_stage_key cond_stage_key cond_stage_trainable monitor use_ema "
        "ckpt_path ignore_keys load_only_unet loss_type l_simple_weight original_elbo_weight learn_logvar "
        "logvar_init use_positional_encodings clip_denoised cosine_s make_it_fit reset_ema "
        "reset_num_ema_updates scheduler_config".split()
    ),
    "unet_config": {"use_checkpoint", "image_size", "legacy", "use_bf16"},
    "first_stage_config": set(
        "monitor image_key ignore_keys colorize_nlabels ckpt_path ema_decay learn_logvar".split()
    ),
    "cond_stage_config": {"version", "device", "freeze"},
}
# "vanilla-xformers" is the same block with the same weights (the original picks it when xformers imports).
_SAME_AS_VANILLA = {"vanilla-xformers"}


def _get(section: dict, key: str, where: str, source: str) -> Any:
    if key not in section:
        raise ConfigError(f"Config {source} has no {where}.{key}; it is required for an SD 2.1 model.")
    return section[key]


def _check_target(node: dict, section: str, where: str, source: str) -> dict:
    target = node.get("target") if isinstance(node, dict) else None
    if target != TARGETS[section]:
        raise ConfigError(
            f"Config {source}: {where}.target is {target!r}, but this package implements only "
            f"{TARGETS[section]!r} there. Targets are checked, never imported, so other model classes cannot "
            f"be loaded: use the original v2-inference.yaml / v2-inference-v.yaml or a preset "
            f"({', '.join(PRESETS)})."
        )
    params = node.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"Config {source}: {where}.params must be a mapping, got {type(params).__name__}.")
    return params


def _check_keys(params: dict, section: str, where: str, source: str) -> None:
    fixed, known = _FIXED.get(section, {}), _READ[section] | _IGNORED.get(section, set())
    for key, value in params.items():
        if key in fixed:
            ok = value == fixed[key] or (key == "attn_type" and value in _SAME_AS_VANILLA)
            if not ok:
                raise ConfigError(
                    f"Config {source}: {where}.{key} is {value!r}; this package implements SD 2.1, which "
                    "uses "
                    f"{fixed[key]!r}. Remove the key or set it to {fixed[key]!r}."
                )
        elif key not in known:
            raise ConfigError(
                f"Config {source}: unknown key {where}.{key}. It is not an SD 2.1 LDM config parameter this "
                f"package knows; remove it (or check the spelling)."
            )


def _section_dataclass(cls: type, params: dict, where: str, source: str) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in params and f.default is not dataclasses.MISSING:
            continue
        value = _get(params, f.name, where, source)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def resolve_config_path(preset_or_path: str | Path) -> tuple[str, Path]:
    """(name, path) for a preset name or a YAML path; ConfigError if neither exists."""
    if str(preset_or_path) in _PRESET_FILES:
        return str(preset_or_path), CONFIG_DIR / _PRESET_FILES[str(preset_or_path)]
    path = Path(preset_or_path)
    if not path.is_file():
        raise ConfigError(
            f"No preset or config file named {str(preset_or_path)!r}. Presets: {', '.join(PRESETS)}; "
            f"otherwise pass the path of an LDM YAML such as v2-inference.yaml."
        )
    for name, file in _PRESET_FILES.items():
        if path.resolve() == (CONFIG_DIR / file).resolve():
            return name, path
    return path.stem, path


def load_config(preset_or_path: str | Path) -> ModelConfig:
    """Read a preset ("sd21-base", "sd21-v", "tiny") or an LDM YAML file into a ModelConfig."""
    name, path = resolve_config_path(preset_or_path)
    source = str(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ConfigError(f"Config {source} is not readable YAML ({type(exc).__name__}: {exc}).") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"Config {source} has no top-level 'model' section; it is not an LDM config.")

    model = _check_target(raw["model"], "model", "model", source)
    _check_keys(model, "model", "model.params", source)
    unet_p = _check_target(
        _get(model, "unet_config", "model.params", source), "unet_config", "model.params.unet_config", source
    )
    _check_keys(unet_p, "unet_config", "model.params.unet_config.params", source)
    vae_where = "model.params.first_stage_config"
    vae_p = _check_target(
        _get(model, "first_stage_config", "model.params", source), "first_stage_config", vae_where, source
    )
    _check_keys(vae_p, "first_stage_config", f"{vae_where}.params", source)
    if "lossconfig" in vae_p:
        _check_target(vae_p["lossconfig"], "lossconfig", f"{vae_where}.params.lossconfig", source)
    ddconfig = _get(vae_p, "ddconfig", f"{vae_where}.params", source)
    _check_keys(ddconfig, "ddconfig", f"{vae_where}.params.ddconfig", source)
    text_p = _check_target(
        _get(model, "cond_stage_config", "model.params", source),
        "cond_stage_config",
        "model.params.cond_stage_config",
        source,
    )
    _check_keys(text_p, "cond_stage_config", "model.params.cond_stage_config.params", source)

    unet = _section_dataclass(UNetConfig, unet_p, "model.params.unet_config.params", source)
    for key in ("transformer_depth", "context_dim", "num_head_channels"):
        if not isinstance(getattr(unet, key), int) or getattr(unet, key) <= 0:
            raise ConfigError(
                f"Config {source}: unet_config.params.{key} must be a positive integer "
                f"(SD 2.1 uses one value for every level), got {getattr(unet, key)!r}."
            )
    vae = _section_dataclass(
        VAEConfig,
        {**ddconfig, "embed_dim": _get(vae_p, "embed_dim", vae_where, source)},
        f"{vae_where}.params.ddconfig",
        source,
    )
    text = TextEncoderConfig(
        arch=text_p.get("arch", "ViT-H-14"),
        layer=text_p.get("layer", "last"),
        max_length=text_p.get("max_length", 77),
    )
    if text.layer not in ("last", "penultimate"):
        raise ConfigError(
            f"Config {source}: cond_stage_config.params.layer is {text.layer!r}; "
            f"FrozenOpenCLIPEmbedder supports 'last' and 'penultimate'."
        )

    parameterization = model.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise ConfigError(f"Config {source}: parameterization {parameterization!r} is not 'eps' or 'v'.")
    # The v-models of SD 2.x are the 768 px ones (the original README runs them at --H 768 --W 768);
    # otherwise the training latent side `image_size` times the VAE factor (64 * 8 = 512 for sd21-base).
    latent_side = model.get("image_size", 64)
    default_size = 768 if parameterization == "v" else latent_side * 2 ** (len(vae.ch_mult) - 1)
    return ModelConfig(
        name=name,
        parameterization=parameterization,
        linear_start=float(model.get("linear_start", 1e-4)),
        linear_end=float(model.get("linear_end", 2e-2)),
        timesteps=int(model.get("timesteps", 1000)),
        scale_factor=float(model.get("scale_factor", 1.0)),
        channels=int(model.get("channels", 3)),
        unet=unet,
        vae=vae,
        text=text,
        default_size=default_size,
        source=source,
    )
