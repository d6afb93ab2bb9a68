"""sd.vae: padding, moments, the mid-block attention through the registry, and diffusers as the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from sd.attention import attend_original, available_attention, resolve_attention
from sd.vae import AutoencoderKL, Downsample, moments_to_mean_std

AVAILABLE = [name for name, why in available_attention("cpu", head_dims=(128,)).items() if why is None]


@pytest.fixture(scope="module")
def vae(tiny_model):
    return tiny_model.vae


def _image(batch=1, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g) * 2 - 1


def test_encoder_downsample_pads_right_and_bottom_only():
    down = Downsample(4)
    assert down.conv.padding == (0, 0) and down.conv.stride == (2, 2)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(
        down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    )
    assert down(x).shape == (1, 4, 4, 4)


def test_norms_are_eps_1e6(vae):
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 and m.num_groups == 32 for m in norms)


def test_shapes_and_finite_outputs(vae):
    image = _image(batch=2, size=(32, 48))
    with torch.no_grad():
        moments = vae.encode(image)
        assert moments.shape == (2, 8, 4, 6) and torch.isfinite(moments).all()
        decoded = vae.decode(moments[:, :4])
    assert decoded.shape == (2, 3, 32, 48) and torch.isfinite(decoded).all() and decoded.std() > 1e-3


def test_encode_returns_logvar_before_clamping(tiny_config):
    vae = AutoencoderKL(tiny_config.vae, attend_original).eval()
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0.5, 0, 0, 0, -50.0, -50, 30, 30]))
        moments = vae.encode(_image())
    assert moments[:, 4:6].eq(-50).all() and moments[:, 6:].eq(30).all()  # not clamped to [-30, 20]
    mean, std = moments_to_mean_std(moments)
    assert mean[:, 0].eq(0.5).all()
    torch.testing.assert_close(std[:, 0], torch.full_like(std[:, 0], torch.exp(torch.tensor(-15.0)).item()))
    torch.testing.assert_close(std[:, 3], torch.full_like(std[:, 3], torch.exp(torch.tensor(10.0)).item()))


def test_mid_block_attention_runs_the_chosen_kernel_single_head(tiny_config):
    seen = []

    def spy(q, k, v):
        seen.append(tuple(q.shape))
        return attend_original(q, k, v)

    vae = AutoencoderKL(tiny_config.vae, spy).eval()
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 4, 4))
    assert seen == [(1, 1, 16, 128)]  # (B, heads=1, HW, C) with C the mid-block width


@pytest.mark.parametrize("name", AVAILABLE)
def test_available_backends_agree_with_original_in_the_vae(tiny_config, vae, name):
    other = AutoencoderKL(tiny_config.vae, resolve_attention(name, head_dims=(128,))).eval()
    other.load_state_dict(vae.state_dict())
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(other.decode(z), vae.decode(z), 2e-5, 2e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_encode_matches_diffusers(vae, oracle, size):
    image = _image(batch=2, size=size, seed=1)
    with torch.no_grad():
        theirs = oracle.vae.quant_conv(oracle.vae.encoder(image))
        assert_close(vae.encode(image), theirs, 2e-5, 2e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("size", [(4, 4), (6, 4)])
def test_decode_matches_diffusers(vae, oracle, size):
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(vae.decode(z), oracle.vae.decode(z).sample, 2e-5, 2e-5)
