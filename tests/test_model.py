"""sd.model and sd.schedule: load_model's options, random weights, the schedule buffers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import micro_config

from sd import attention, capabilities
from sd.config import load_config
from sd.errors import AttentionUnavailable, CheckpointError, ConfigError
from sd.model import StableDiffusion, load_model
from sd.schedule import SCHEDULE_BUFFERS, schedule_buffers


def test_schedule_matches_register_schedule_in_numpy():
    # DDPM.register_schedule, written with numpy in float64 as the original does.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    expected = [
        betas,
        ac,
        ac_prev,
        np.sqrt(ac),
        np.sqrt(1 - ac),
        np.log(1 - ac),
        np.sqrt(1 / ac),
        np.sqrt(1 / ac - 1),
        post_var,
        np.log(np.maximum(post_var, 1e-20)),
        betas * np.sqrt(ac_prev) / (1 - ac),
        (1 - ac_prev) * np.sqrt(alphas) / (1 - ac),
    ]
    ours = schedule_buffers(0.00085, 0.012, 1000)
    assert tuple(ours) == SCHEDULE_BUFFERS
    for (name, value), ref in zip(ours.items(), expected, strict=True):
        assert value.dtype == torch.float32 and value.shape == (1000,), name
        np.testing.assert_allclose(value.numpy(), ref.astype(np.float32), rtol=1e-6, atol=0, err_msg=name)
    ac32 = ours["alphas_cumprod"]
    # The original's float32 alphas_cumprod (DDPM.register_schedule), as measured on its code.
    for i, value in ((0, 0.99915), (1, 0.998296), (981, 0.0057755), (999, 0.0046601)):
        assert abs(ac32[i].item() - value) < 5e-7, i


def test_tiny_model_api(tiny_model):
    assert isinstance(tiny_model, StableDiffusion) and not tiny_model.training
    assert tiny_model.parameterization == "eps" and tiny_model.attention == "original"
    assert type(tiny_model.scale_factor) is float and tiny_model.scale_factor == 0.18215
    assert tiny_model.alphas_cumprod.dtype == torch.float32 and tiny_model.alphas_cumprod.shape == (1000,)
    assert (
        tiny_model.unet is tiny_model.model.diffusion_model and tiny_model.vae is tiny_model.first_stage_model
    )
    assert tiny_model.text_encoder is tiny_model.cond_stage_model
    children = [name for name, _ in tiny_model.named_children()]
    assert children == ["model", "first_stage_model", "cond_stage_model"]
    assert list(tiny_model.state_dict())[:12] == list(SCHEDULE_BUFFERS)
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_text_and_denoise_path_is_finite(tiny_model):
    tokens = tiny_model.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 77)
    with torch.no_grad():
        context = tiny_model.encode_text(["a photograph of an astronaut riding a horse", ""])
        assert context.shape == (2, 77, 256) and torch.isfinite(context).all()
        eps = tiny_model.unet(torch.randn(2, 4, 8, 8), 981, context)
        image = tiny_model.vae.decode(eps / tiny_model.scale_factor)
    assert torch.isfinite(eps).all() and 1e-2 < eps.std() < 1e2
    assert image.shape == (2, 3, 64, 64) and torch.isfinite(image).all()


def test_random_weights_are_deterministic_and_private(tiny_config):
    cfg = micro_config(tiny_config)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = load_model(cfg, seed=7), load_model(cfg, seed=7), load_model(cfg, seed=8)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.diffusion_model.out.2.weight"], sc["model.diffusion_model.out.2.weight"])
    # The layers the original zero-initialises are random here, so outputs depend on inputs.
    for key in (
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
        "model.diffusion_model.input_blocks.1.1.proj_out.weight",
    ):
        assert sa[key].abs().sum() > 0, key


def test_dtype_keeps_schedule_float32_and_channels_last(tiny_config):
    model = load_model(micro_config(tiny_config), dtype=torch.bfloat16, channels_last=True)
    assert model.unet.time_embed[0].weight.dtype == torch.bfloat16
    assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert all(getattr(model, name).dtype == torch.float32 for name in SCHEDULE_BUFFERS)
    conv = model.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.channels_last
    with torch.no_grad():
        out = model.unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 256))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_meta_device_allocates_nothing(tiny_config):
    model = load_model(tiny_config, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())


def test_unavailable_attention_raises_before_building():
    with pytest.raises(AttentionUnavailable) as exc:
        load_model("tiny", attention="xformers")
    assert "Available on this machine" in str(exc.value)
    with pytest.raises(ConfigError):
        load_model("no-such-preset")


@pytest.mark.skipif(not capabilities.has_sdpa(), reason="needs F.scaled_dot_product_attention (PyTorch 2)")
def test_set_attention_switches_every_attention(tiny_config):
    model = load_model(micro_config(tiny_config))
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 256)
    with torch.no_grad():
        ref = model.unet(x, 3, c)
        model.set_attention("sdpa-math")
        assert model.attention == "sdpa-math"
        attends = {m.attend.__name__ for m in model.modules() if hasattr(m, "attend")}
        assert attends == {"attend_sdpa_math"}
        torch.testing.assert_close(model.unet(x, 3, c), ref, atol=2e-5, rtol=2e-5)


def test_same_architecture_from_a_path(tiny_config):
    model = load_model(tiny_config.source, device="meta")
    assert model.config == load_config("tiny")


def test_checkpoint_round_trip_in_half_precision(tmp_path, tiny_config):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg = micro_config(tiny_config)
    source = load_model(cfg, seed=1)
    path = tmp_path / "micro.safetensors"
    safetensors_torch.save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_model(cfg, path, seed=2)  # the checkpoint, not the seed, decides the weights
    targets = loaded.state_dict()
    for key, value in source.state_dict().items():
        target = targets[key]
        assert target.dtype == torch.float32, key
        torch.testing.assert_close(target, value.half().float(), atol=0, rtol=0)


@pytest.fixture
def saved_micro(tmp_path, tiny_config):
    """(config, model, its .safetensors file): a random micro model saved with the original keys."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg = micro_config(tiny_config)
    source = load_model(cfg, seed=1)
    path = tmp_path / "micro.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return cfg, source, path


def test_checkpoint_model_computes_what_the_saved_model_computes(saved_micro):
    # Loading skips the random initialisation; every tensor, non-persistent ones such as the text
    # encoder's causal mask included, and so every output must still be the saved model's.
    cfg, source, path = saved_micro
    loaded = load_model(cfg, path, seed=2)
    buffers = dict(loaded.named_buffers())
    for name, value in source.named_buffers():
        torch.testing.assert_close(buffers[name], value, atol=0, rtol=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        for model_out, expected in (
            (loaded.encode_text(["a photo", ""]), source.encode_text(["a photo", ""])),
            (
                loaded.unet(x, t, source.encode_text(["a", "b"])),
                source.unet(x, t, source.encode_text(["a", "b"])),
            ),
            (loaded.vae.decode(x), source.vae.decode(x)),
        ):
            torch.testing.assert_close(model_out, expected, atol=0, rtol=0)


def test_failed_checkpoint_load_restores_weight_initialisation(tmp_path, tiny_config):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file({"not.a.key": torch.zeros(2)}, str(path))
    before = {
        n: getattr(torch.nn.init, n) for n in ("normal_", "kaiming_uniform_", "zeros_", "xavier_uniform_")
    }
    with pytest.raises(CheckpointError, match="missing"):
        load_model(micro_config(tiny_config), path)
    assert {n: getattr(torch.nn.init, n) for n in before} == before
    weight = torch.zeros(64, 64)
    torch.nn.init.kaiming_uniform_(weight)
    assert weight.abs().max() > 0  # initialisation works again after the failed load


def narrow_kernel(limit):
    """A kernel that, like flash attention on CUDA, stops at a head dim (256 there; `limit` here)."""

    def narrow(q, k, v):
        if q.shape[-1] > limit:
            raise RuntimeError("No available kernel.")
        return attention.attend_original(q, k, v)

    return narrow


def refusing_backend(monkeypatch, name, kernel):
    """Swap `name`'s registry entry for `kernel`, as if this PyTorch had it (also where SDPA is absent)."""
    fallbacks = attention._REGISTRY[name].vae_fallbacks
    monkeypatch.setitem(attention._REGISTRY, name, attention.Backend(lambda: kernel, lambda: None, fallbacks))
    monkeypatch.setattr(attention, "_PROBES", {})


def wide_vae_config(tiny_config):
    cfg = micro_config(tiny_config)
    return dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, ch_mult=(1, 4)))  # VAE head: 128


def test_vae_falls_back_when_the_kernel_cannot_take_its_wide_head(monkeypatch, tiny_config):
    narrow = narrow_kernel(64)  # the UNet's 64-d heads run, the VAE's 128-wide head does not
    refusing_backend(monkeypatch, "sdpa-flash", narrow)
    model = load_model(wide_vae_config(tiny_config), attention="sdpa-flash")
    runs_wide = attention.available_attention("cpu", torch.float32, (128,))
    chain = attention._REGISTRY["sdpa-flash"].vae_fallbacks
    expected = next(name for name in chain if runs_wide[name] is None)
    assert (model.attention, model.vae_attention) == ("sdpa-flash", expected)
    assert all(m.attend is narrow for m in model.unet.modules() if hasattr(m, "attend"))
    assert all(m.attend is not narrow for m in model.vae.modules() if hasattr(m, "attend"))
    # An explicit VAE kernel is not second-guessed: it runs or it raises.
    with pytest.raises(AttentionUnavailable) as exc:
        load_model(wide_vae_config(tiny_config), attention="sdpa-flash", vae_attention="sdpa-flash")
    assert "VAE" in str(exc.value) and "head dim 128" in str(exc.value)
    model = load_model(wide_vae_config(tiny_config), attention="sdpa-flash", vae_attention="original")
    assert model.vae.decoder.mid.attn_1.attend is attention.attend_original


def test_a_unet_kernel_that_cannot_run_is_named_never_the_vae(monkeypatch, tiny_config):
    refusing_backend(monkeypatch, "sdpa-flash", narrow_kernel(32))  # refuses the UNet's 64-d heads too
    with pytest.raises(AttentionUnavailable) as exc:
        load_model(wide_vae_config(tiny_config), attention="sdpa-flash")
    message = str(exc.value)
    assert message.startswith("Attention backend 'sdpa-flash' cannot run here: ") and "head dim 64" in message
    assert "VAE" not in message


def test_fused_projections_match_and_keep_the_original_keys(tmp_path, saved_micro):
    from safetensors.torch import save_file

    cfg, source, path = saved_micro
    fused = load_model(cfg, path, fuse_projections=True)
    assert fused.fused_projections and not source.fused_projections
    assert hasattr(fused.unet.middle_block[1].transformer_blocks[0].attn1, "to_qkv")
    assert hasattr(fused.vae.decoder.mid.attn_1, "qkv")
    saved = fused.state_dict()
    assert list(saved) == list(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(saved[key], value), key
    resaved = tmp_path / "resaved.safetensors"
    save_file(saved, str(resaved))  # the fused model saves an original-keyed file
    again = load_model(cfg, resaved)  # and it loads strictly into an unfused model
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, cfg.unet.context_dim)
    with torch.no_grad():
        for part in (
            lambda m: m.unet(x, t, c),
            lambda m: m.vae.decode(x),
            lambda m: m.vae.encode(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
        ):
            expected = part(source)
            torch.testing.assert_close(part(fused), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(part(again), expected, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flash_model_runs_its_vae_and_fused_projections(tiny_config):
    if attention.available_attention("cuda", torch.float16)["sdpa-flash"] is not None:
        pytest.skip("no flash kernel on this GPU/PyTorch")
    cfg = micro_config(tiny_config)
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, ch=128, ch_mult=(1, 4)))  # VAE head: 512
    kwargs = {"attention": "sdpa-flash", "device": "cuda", "dtype": torch.float16}
    model, fused = load_model(cfg, **kwargs), load_model(cfg, fuse_projections=True, **kwargs)
    assert model.attention == "sdpa-flash" and model.vae_attention != "sdpa-flash"
    x, t = torch.randn(2, 4, 16, 16, device="cuda"), torch.tensor([3, 700], device="cuda")
    c = torch.randn(2, 77, cfg.unet.context_dim, device="cuda")
    with torch.no_grad():
        image = model.decode_latents(x)
        assert image.shape == (2, 3, 32, 32) and torch.isfinite(image).all()
        torch.testing.assert_close(fused.decode_latents(x), image, atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(fused.unet(x, t, c), model.unet(x, t, c), atol=1e-2, rtol=1e-2)
