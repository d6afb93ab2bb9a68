"""Shared fixtures: tiny configs and models with deterministic weights, and the diffusers oracle.

Everything runs on the CPU in seconds with nothing downloaded. `tiny_model` is built once per session;
tests must not modify it (build their own with `sd.model.load_model` when they need to).
"""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import pytest
import torch

from sd.config import ModelConfig, load_config
from sd.model import StableDiffusion, load_model

# Unit tests check numbers, not speed: one intra-op thread avoids OpenMP oversubscription (10x slowdowns)
# on the shared CPUs these tests run on.
torch.set_num_threads(1)


def micro_config(base: ModelConfig) -> ModelConfig:
    """The tiny config cut to two levels with one ResBlock each: attention at level 0, none at level 1."""
    unet = dataclasses.replace(base.unet, channel_mult=(1, 2), attention_resolutions=(1,), num_res_blocks=1)
    vae = dataclasses.replace(base.vae, ch_mult=(1, 2), num_res_blocks=1)
    return dataclasses.replace(base, name="micro", unet=unet, vae=vae)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_model() -> StableDiffusion:
    """load_model("tiny", seed=0) on the CPU in fp32 with "original" attention. Read-only."""
    return load_model("tiny", seed=0)


@pytest.fixture(scope="session")
def oracle(tiny_model: StableDiffusion) -> SimpleNamespace:
    """diffusers' UNet2DConditionModel and AutoencoderKL built from tiny.yaml by diffusers' own LDM
    config translation and loaded with tiny_model's state dict through its LDM-checkpoint converters."""
    diffusers = pytest.importorskip(
        "diffusers", reason="the numerical oracle needs diffusers (PyTorch 2 envs)"
    )
    from diffusers.loaders import single_file_utils as sfu
    from omegaconf import OmegaConf

    original = OmegaConf.to_container(OmegaConf.load(tiny_model.config.source))
    checkpoint = dict(tiny_model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there; it only sets sample_size
        unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=384)
        vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=384)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    return SimpleNamespace(unet=unet.eval().requires_grad_(False), vae=vae.eval().requires_grad_(False))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol_of_max: float) -> None:
    """max|a - e| <= atol + rtol_of_max * max|e| (absolute and relative-to-scale, as the issue asks)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= atol + rtol_of_max * scale, f"max abs error {err:.3g} (reference max {scale:.3g})"


@pytest.fixture(autouse=True)
def _own_results_store(tmp_path_factory, monkeypatch):
    """Every test that runs `perf_tests run` records into a store of its own, never the user's."""
    monkeypatch.setenv("SD_PERF_STORE", str(tmp_path_factory.mktemp("store") / "store.sqlite"))
