"""OpenCLIPTextEncoder against plain-torch math of the CLIP text transformer written here from raw tensors.

Runs under both open_clip generations (sequence-first 2.0.2 in the torch1 environment, batch-first 3.x in
torch2).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from sd import capabilities
from sd.config import TextEncoderConfig
from sd.errors import ConfigError
from sd.text_encoder import OpenCLIPTextEncoder

MANIFEST = Path(__file__).parent / "data" / "sd21-checkpoint-manifest.json"
PROMPTS = ["a photograph of an astronaut riding a horse", "", "A Photo of a cat, in the snow!"]


def reference_encode(sd: dict, tokens: torch.Tensor, n_blocks: int, heads: int) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer, batch-first, from the state dict's tensors."""
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]  # (B, L, D)
    B, L, D = x.shape
    d = D // heads
    mask = torch.full((L, L), float("-inf")).triu(1)
    for i in range(n_blocks):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (D,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask, dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, L, D)
        x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (D,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return F.layer_norm(x, (D,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(TextEncoderConfig("sd-tiny-text", "penultimate"))
    # Non-trivial norms and biases, so that every tensor matters.
    with torch.no_grad():
        for name, t in enc.model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_final"):
                t.add_(0.1 * torch.randn_like(t))
    return enc


def test_tokenizer_matches_open_clip_tokenize(tiny_encoder):
    tokens = tiny_encoder.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, :11].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 0]
    assert tokens[0, 11:].eq(0).all()
    assert tokens[1, :3].tolist() == [49406, 49407, 0] and tokens[1, 2:].eq(0).all()
    assert torch.equal(tiny_encoder.tokenize("A PHOTOGRAPH  of an astronaut riding a horse")[0], tokens[0])
    long = tiny_encoder.tokenize("word " * 200)
    assert long.shape == (1, 77) and long[0, -1] == 49407


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_matches_reference_math(tiny_encoder, layer):
    enc = tiny_encoder
    if layer == "last":
        enc = OpenCLIPTextEncoder(TextEncoderConfig("sd-tiny-text", "last"))
        enc.load_state_dict(tiny_encoder.state_dict())
    sd = {k: v.detach() for k, v in enc.model.state_dict().items()}
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ours = enc.encode(PROMPTS)
        ref = reference_encode(sd, tokens, 3 if layer == "penultimate" else 4, heads=4)
    assert ours.shape == (3, 77, 256)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_penultimate_differs_from_last(tiny_encoder):
    last = OpenCLIPTextEncoder(TextEncoderConfig("sd-tiny-text", "last"))
    last.load_state_dict(tiny_encoder.state_dict())
    with torch.no_grad():
        assert not torch.allclose(last.encode(PROMPTS[:1]), tiny_encoder.encode(PROMPTS[:1]))


def test_batch_rows_are_independent(tiny_encoder):
    """The open_clip >= 2.26 pitfall (sequence-first permute on batch-first blocks) mixes the batch."""
    with torch.no_grad():
        batch = tiny_encoder.encode(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(batch[i : i + 1], tiny_encoder.encode([prompt]), rtol=0, atol=1e-5)


def test_frozen_and_mask_not_persistent(tiny_encoder):
    assert not tiny_encoder.training
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    keys = set(tiny_encoder.model.state_dict())
    assert "attn_mask" not in keys and {"logit_scale", "text_projection", "ln_final.weight"} <= keys
    mask = tiny_encoder.model.attn_mask
    assert mask[0, 1] == float("-inf") and mask[1, 0] == 0 and mask[5, 5] == 0


@pytest.mark.skipif(
    not capabilities.has_device_context(), reason="PyTorch < 2 builds meta modules on the CPU first (slow)"
)
def test_vit_h_14_on_meta_matches_manifest():
    enc = OpenCLIPTextEncoder(TextEncoderConfig("ViT-H-14", "penultimate"), device="meta")
    manifest = json.loads(MANIFEST.read_text())["sd21-base"]
    prefix = "cond_stage_model.model."
    expected = [(k[len(prefix) :], shape) for k, shape in manifest.items() if k.startswith(prefix)]
    assert [(k, list(v.shape)) for k, v in enc.model.state_dict().items()] == expected
    assert all(p.device.type == "meta" for p in enc.parameters())
    assert sum(p.numel() for p in enc.parameters()) == 354_032_641
    assert enc.num_layers == 23 and enc.width == 1024


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="add_model_config") as err:
        OpenCLIPTextEncoder(TextEncoderConfig("ViT-H-15", "penultimate"))
    assert "ViT-H-14" in str(err.value)  # a close name is suggested
    with pytest.raises(ConfigError, match="penultimate"):
        OpenCLIPTextEncoder(TextEncoderConfig("sd-tiny-text", "middle"))


def test_arch_registered_with_add_model_config(tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (tmp_path / "sd-test-registered-text.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "sd-test-registered-text.json")
    enc = OpenCLIPTextEncoder(TextEncoderConfig("sd-test-registered-text", "penultimate"))
    with torch.no_grad():
        out = enc.encode(["hello"])
    assert out.shape == (1, 77, 64) and torch.isfinite(out).all()
    sd = {k: v for k, v in enc.model.state_dict().items()}
    torch.testing.assert_close(
        out, reference_encode(sd, enc.tokenize(["hello"]), 1, heads=2), rtol=0, atol=2e-5
    )
