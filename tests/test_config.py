"""sd.config: presets, the LDM YAML -> dataclass reading, and its refusals."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sd.config import CONFIG_DIR, PRESETS, TARGETS, ModelConfig, load_config
from sd.errors import ConfigError, SDError


def test_presets_are_the_three_names():
    assert PRESETS == ("sd21-base", "sd21-v", "tiny")


def test_sd21_base_values_follow_the_original_yaml():
    cfg = load_config("sd21-base")
    assert (cfg.parameterization, cfg.linear_start, cfg.linear_end, cfg.timesteps) == (
        "eps",
        0.00085,
        0.012,
        1000,
    )
    assert (cfg.scale_factor, cfg.channels, cfg.default_size) == (0.18215, 4, 512)
    u = cfg.unet
    assert (u.in_channels, u.out_channels, u.model_channels, u.num_res_blocks) == (4, 4, 320, 2)
    assert (u.attention_resolutions, u.channel_mult) == ((4, 2, 1), (1, 2, 4, 4))
    assert (u.num_head_channels, u.transformer_depth, u.context_dim) == (64, 1, 1024)
    assert u.use_linear_in_transformer and u.use_fp16
    v = cfg.vae
    assert (v.embed_dim, v.z_channels, v.in_channels, v.out_ch, v.ch) == (4, 4, 3, 3, 128)
    assert (v.ch_mult, v.num_res_blocks, v.double_z, v.resolution) == ((1, 2, 4, 4), 2, True, 256)
    assert (v.attn_resolutions, v.dropout) == ((), 0.0)
    assert (cfg.text.arch, cfg.text.layer, cfg.text.max_length) == ("ViT-H-14", "penultimate", 77)


def test_sd21_v_differs_only_by_parameterization():
    base, v = load_config("sd21-base"), load_config("sd21-v")
    assert v.parameterization == "v" and v.default_size == 768
    same = dataclasses.replace(
        v, name=base.name, parameterization="eps", default_size=512, source=base.source
    )
    assert same == base
    base_yaml = OmegaConf.to_container(OmegaConf.load(base.source))
    v_yaml = OmegaConf.to_container(OmegaConf.load(v.source))
    assert v_yaml["model"]["params"].pop("parameterization") == "v"
    assert v_yaml == base_yaml


def test_tiny_has_the_documented_widths_and_the_same_yaml_structure():
    cfg = load_config("tiny")
    u, v = cfg.unet, cfg.vae
    assert (u.model_channels, u.channel_mult, u.num_res_blocks, u.attention_resolutions) == (
        64,
        (1, 2, 4, 4),
        2,
        (4, 2, 1),
    )
    assert (u.num_head_channels, u.context_dim, u.transformer_depth) == (64, 256, 1)
    assert u.use_linear_in_transformer and not u.use_fp16
    assert (v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.embed_dim) == (32, (1, 2, 4, 4), 2, 4, 4)
    assert (cfg.text.arch, cfg.text.layer, cfg.default_size) == ("sd-tiny-text", "penultimate", 384)

    def keys(node, prefix=""):
        if isinstance(node, dict):
            return {k2 for k, val in node.items() for k2 in keys(val, f"{prefix}.{k}")} | {prefix}
        return {prefix}

    tiny = OmegaConf.to_container(OmegaConf.load(cfg.source))
    base = OmegaConf.to_container(OmegaConf.load(load_config("sd21-base").source))
    assert keys(tiny) - keys(base) == {".model.params.cond_stage_config.params.arch"}
    assert keys(base) <= keys(tiny)


def test_tiny_open_clip_text_config_is_shipped():
    spec = json.loads((CONFIG_DIR / "open_clip" / "sd-tiny-text.json").read_text())
    assert spec["embed_dim"] == 256
    text = spec["text_cfg"]
    assert (text["width"], text["heads"], text["layers"], text["context_length"], text["vocab_size"]) == (
        256,
        4,
        4,
        77,
        49408,
    )


def test_path_and_name_give_the_same_config(tmp_path):
    assert load_config(CONFIG_DIR / "v2-inference.yaml") == load_config("sd21-base")
    copy = tmp_path / "my-sd.yaml"
    copy.write_text((CONFIG_DIR / "v2-inference-v.yaml").read_text())
    mine = load_config(str(copy))
    assert (mine.name, mine.source) == ("my-sd", str(copy))
    assert dataclasses.replace(mine, name="sd21-v", source=load_config("sd21-v").source) == load_config(
        "sd21-v"
    )


def test_configs_are_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.unet.model_channels = 3  # type: ignore[misc]
    assert isinstance(cfg, ModelConfig)


def _write_variant(tmp_path: Path, edit) -> Path:
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "v2-inference.yaml"))
    edit(raw)
    path = tmp_path / "variant.yaml"
    path.write_text(OmegaConf.to_yaml(raw))
    return path


def _one_paragraph(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and isinstance(exc.value, SDError)
    return message


@pytest.mark.parametrize("section", ["model", "unet_config", "first_stage_config", "cond_stage_config"])
def test_unknown_target_is_refused_and_never_imported(tmp_path, section):
    def edit(raw):
        node = raw["model"] if section == "model" else raw["model"]["params"][section]
        node["target"] = "sd_test_never_imported_module.Model"

    with pytest.raises(ConfigError) as exc:
        load_config(_write_variant(tmp_path, edit))
    message = _one_paragraph(exc)
    assert "sd_test_never_imported_module.Model" in message and TARGETS[section] in message
    assert "sd_test_never_imported_module" not in sys.modules


@pytest.mark.parametrize(
    ("where", "key", "value", "expect"),
    [
        ("unet_config", "use_scale_shift_norm", True, "use_scale_shift_norm"),
        ("unet_config", "num_clases", 10, "unknown key"),
        ("model", "conditioning_key", "concat", "crossattn"),
        ("ddconfig", "attn_type", "linear", "attn_type"),
        ("cond_stage_config", "layer", "pooled", "penultimate"),
    ],
)
def test_values_other_than_sd21_are_refused(tmp_path, where, key, value, expect):
    def edit(raw):
        params = raw["model"]["params"]
        node = {
            "model": params,
            "unet_config": params["unet_config"]["params"],
            "ddconfig": params["first_stage_config"]["params"]["ddconfig"],
            "cond_stage_config": params["cond_stage_config"]["params"],
        }[where]
        node[key] = value

    with pytest.raises(ConfigError) as exc:
        load_config(_write_variant(tmp_path, edit))
    assert expect in _one_paragraph(exc)


def test_xformers_attn_type_is_the_same_model(tmp_path):
    def edit(raw):
        raw["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"

    cfg = load_config(_write_variant(tmp_path, edit))
    assert cfg.vae == load_config("sd21-base").vae


def test_missing_file_or_preset_names_the_presets(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("sd15")
    assert "sd21-base" in _one_paragraph(exc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError):
        load_config(bad)
