"""sd.unet: the numerics of the original openaimodel.py UNetModel, and the whole UNet against diffusers' (the
oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from sd.attention import attend_original, available_attention, resolve_attention
from sd.layers import GroupNorm32
from sd.unet import (
    GEGLU,
    Downsample,
    ResBlock,
    SpatialTransformer,
    UNetModel,
    timestep_embedding,
)

AVAILABLE = [name for name, why in available_attention("cpu").items() if why is None]


def test_timestep_embedding_is_cos_first_float32():
    t = torch.tensor([0, 1, 999])  # int64 as DDIM passes them
    emb = timestep_embedding(t, 8)
    assert emb.dtype == torch.float32 and emb.shape == (3, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs] for tt in (0, 1, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=2e-4, rtol=0)
    # Fractional timesteps (DPM-Solver's) are not rounded.
    assert not torch.equal(
        timestep_embedding(torch.tensor([500.5]), 8), timestep_embedding(torch.tensor([500.0]), 8)
    )


def test_geglu_first_half_value_second_half_gate_exact_gelu():
    geglu = GEGLU(2, 3)
    with torch.no_grad():
        geglu.proj.weight.copy_(torch.eye(6, 2) * 0 + torch.arange(12.0).reshape(6, 2) / 10)
        geglu.proj.bias.zero_()
    x = torch.tensor([[1.0, -2.0]])
    h = geglu.proj(x)
    value, gate = h[:, :3], h[:, 3:]
    torch.testing.assert_close(geglu(x), value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))))


def test_norm_epsilons_and_fp32_group_norm():
    block = ResBlock(32, 16, 32)
    assert block.in_layers[0].eps == 1e-5 and block.out_layers[0].eps == 1e-5
    assert SpatialTransformer(32, 1, 32, 1, 8, True, attend_original).norm.eps == 1e-6
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x.float(), 32, eps=1e-5).bfloat16())


def test_downsample_pads_symmetrically():
    op = Downsample(4).op
    assert (op.stride, op.padding, op.kernel_size) == ((2, 2), (1, 1), (3, 3))
    assert Downsample(4)(torch.randn(1, 4, 9, 9)).shape == (1, 4, 5, 5)


@pytest.fixture(scope="module")
def unet(tiny_model):
    return tiny_model.unet


def _inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 77, 256, generator=g)


def test_timesteps_as_int_float_or_tensor_are_the_same(unet):
    x, c = _inputs()
    with torch.no_grad():
        ref = unet(x, 500, c)
        for t in (500.0, torch.tensor(500), torch.tensor([500, 500]), torch.tensor([500.0])):
            torch.testing.assert_close(unet(x, t, c), ref, atol=0, rtol=0)
        per_sample = unet(x, torch.tensor([999, 1]), c)
        torch.testing.assert_close(per_sample[1:], unet(x[1:], 1, c[1:]), atol=1e-5, rtol=1e-5)


def test_output_depends_on_every_input(unet):
    x, c = _inputs()
    with torch.no_grad():
        out = unet(x, 500, c)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 1e-2
        for other in (unet(x + 0.1, 500, c), unet(x, 400, c), unet(x, 500, c + 0.1)):
            assert (other - out).abs().max() > 1e-4


def test_module_names_of_a_level_are_the_originals(unet):
    names = {n for n, _ in unet.named_parameters()}
    for key in (
        "input_blocks.3.0.op.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "out.2.weight",
        "middle_block.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight",
    ):
        assert key in names


def test_bf16_and_channels_last_stay_close_to_fp32(tiny_config, unet):
    x, c = _inputs(batch=1)
    with torch.no_grad():
        ref = unet(x, 250, c)
        last = UNetModel(tiny_config.unet, attend_original).eval()
        last.load_state_dict(unet.state_dict())
        last.to(memory_format=torch.channels_last)
        assert_close(last(x.contiguous(memory_format=torch.channels_last), 250, c), ref, 1e-5, 1e-5)
        half = UNetModel(tiny_config.unet, attend_original).eval()
        half.load_state_dict(unet.state_dict())
        out = half.to(torch.bfloat16)(x, 250, c)  # fp32 inputs are cast to the weights' dtype and back
        assert out.dtype == torch.float32
        assert_close(out, ref, 0.0, 0.1)


@pytest.mark.parametrize("name", AVAILABLE)
def test_available_backends_agree_with_original_in_the_unet(tiny_config, unet, name):
    x, c = _inputs(batch=1)
    other = UNetModel(tiny_config.unet, resolve_attention(name)).eval()
    other.load_state_dict(unet.state_dict())
    with torch.no_grad():
        assert_close(other(x, 700, c), unet(x, 700, c), 2e-5, 2e-5)


@pytest.mark.oracle
@pytest.mark.parametrize(("t", "size"), [(999, (16, 16)), (1, (16, 24)), (480.5, (24, 16))])
def test_unet_matches_diffusers(unet, oracle, t, size):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, *size, generator=g), torch.randn(2, 77, 256, generator=g)
    with torch.no_grad():
        ours = unet(x, t, c)
        theirs = oracle.unet(x, torch.tensor([t, t]), encoder_hidden_states=c).sample
    assert_close(ours, theirs, 2e-5, 2e-5)
