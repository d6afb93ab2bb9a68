"""The full SD 2.1 configs give exactly the original checkpoint's state-dict keys, shapes and sizes.

The reference manifest (key -> shape, in state-dict order, with per-part parameter counts) was produced by
instantiating the original LatentDiffusion; both configs are built here on the meta device (no memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd.model import load_model

# A verbatim copy of the SD 2.1 checkpoint manifest (every key and shape of the original state dict).
MANIFEST = Path(__file__).parent / "data" / "sd21-checkpoint-manifest.json"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


@pytest.fixture(
    scope="module", params=[("sd21-base", "sd21-base"), ("sd21-v", "sd21-768-v")], ids=lambda p: p[0]
)
def built(request, manifest):
    preset, key = request.param
    return load_model(preset, device="meta"), manifest[key]


def test_keys_and_shapes_equal_the_original_checkpoint(built):
    model, expected = built
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    missing = [k for k in expected if k not in ours]
    extra = [k for k in ours if k not in expected]
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"{len(wrong)} shapes differ, e.g. {list(wrong.items())[:3]}"
    assert list(ours) == list(expected)  # also the original's state-dict order


def test_parameter_counts_match(built, manifest):
    model, _ = built
    counts = manifest["notes"]["param_counts"]

    def numel(prefix: str) -> int:
        return sum(t.numel() for name, t in model.named_parameters() if name.startswith(prefix))

    assert numel("model.diffusion_model.") == counts["unet (model.diffusion_model.*)"] == 865_910_724
    assert numel("first_stage_model.") == counts["vae (first_stage_model.*)"]
    assert numel("first_stage_model.encoder.") == counts["vae encoder"]
    assert numel("first_stage_model.decoder.") == counts["vae decoder"]
    assert numel("first_stage_model.quant_conv.") + numel("first_stage_model.post_quant_conv.") == 92
    assert (
        numel("cond_stage_model.model.")
        == counts["text encoder (cond_stage_model.model.*, visual tower deleted)"]
    )
    assert numel("") == counts["total parameters"] == 1_303_597_228
    buffers = dict(model.named_buffers())
    persistent = [name for name in model.state_dict() if name in buffers]
    assert persistent == manifest["notes"]["top_level_buffers"]
    assert all(buffers[name].dtype == torch.float32 for name in persistent)
    assert sum(buffers[name].numel() for name in persistent) == counts["schedule buffers (12 x [1000])"]
