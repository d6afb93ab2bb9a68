"""Checkpoint loading: formats, strictness, known extras, dtypes and broken files (checkpoints made here)."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sd import weights
from sd.errors import CheckpointError


class Toy(nn.Module):
    """Nested names and a persistent buffer, like the real model (model.diffusion_model..., betas)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(4, 8))
        self.first_stage_model = nn.Linear(8, 3)
        self.register_buffer("alphas_cumprod", torch.linspace(1, 0, 10))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def reference_state(dtype=torch.float32):
    torch.manual_seed(0)
    return {k: torch.randn(v.shape).to(dtype) for k, v in Toy().state_dict().items()}


def assert_loaded(model, state):
    for k, v in model.state_dict().items():
        assert v.dtype == next(model.parameters()).dtype
        torch.testing.assert_close(v, state[k].to(v.dtype), rtol=0, atol=0)


def test_safetensors_roundtrip(tmp_path):
    state = reference_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    model = Toy()
    report = weights.load_checkpoint(model, tmp_path / "m.safetensors")
    assert_loaded(model, state)
    assert report.loaded == len(state) and report.source_dtypes == {"float32": len(state)}
    assert not report.ignored and not report.missing


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_with_and_without_state_dict(tmp_path, wrapped):
    state = reference_state()
    obj = {"state_dict": state, "global_step": 110000, "epoch": 3} if wrapped else state
    torch.save(obj, str(tmp_path / "m.ckpt"))
    model = Toy()
    unsafe = not weights.torch_load_has_weights_only()  # PyTorch 1.12 needs the explicit opt-in
    weights.load_checkpoint(model, tmp_path / "m.ckpt", unsafe_pickle=unsafe)
    assert_loaded(model, state)


@pytest.mark.skipif(weights.torch_load_has_weights_only(), reason="this PyTorch has weights_only")
def test_ckpt_refused_without_weights_only(tmp_path):
    torch.save(reference_state(), str(tmp_path / "m.ckpt"))
    with pytest.raises(CheckpointError, match="unsafe_pickle=True") as err:
        weights.load_state_dict_file(tmp_path / "m.ckpt")
    assert "safetensors" in str(err.value) and "--unsafe-pickle" in str(err.value)


@pytest.mark.skipif(not weights.torch_load_has_weights_only(), reason="needs torch.load(weights_only=)")
def test_ckpt_with_python_objects_refused_unless_unsafe(tmp_path):
    torch.save(
        {"state_dict": reference_state(), "callbacks": {"cb": logging.Formatter()}}, str(tmp_path / "m.ckpt")
    )
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refuses") as err:
        weights.load_state_dict_file(tmp_path / "m.ckpt")
    assert "unsafe_pickle=True" in str(err.value) and "safetensors" in str(err.value)
    assert set(weights.load_state_dict_file(tmp_path / "m.ckpt", unsafe_pickle=True)) == set(
        reference_state()
    )


@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.bfloat16])
def test_fp16_checkpoint_into_any_dtype(tmp_path, target):
    state = reference_state(torch.float16)
    save_file(state, str(tmp_path / "m.safetensors"))
    model = Toy().to(target)
    report = weights.load_checkpoint(model, tmp_path / "m.safetensors")
    assert report.source_dtypes == {"float16": len(state)}
    assert_loaded(model, state)


def test_known_extras_are_ignored_and_said(tmp_path, caplog):
    state = reference_state()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_model0weight"] = torch.zeros(3)
    state["cond_stage_model.model.visual.proj"] = torch.zeros(2, 2)
    model = Toy()
    with caplog.at_level(logging.INFO, logger="sd.weights"):
        report = weights.apply_state_dict(model, {**state, "global_step": 5})
    assert report.loaded == len(reference_state())
    ignored = {k for keys in report.ignored.values() for k in keys}
    assert ignored == {
        "model_ema.decay",
        "model_ema.diffusion_model0weight",
        "cond_stage_model.model.visual.proj",
        "global_step",
    }
    assert "ignored known extras" in caplog.text and "EMA" in caplog.text
    assert "EMA" in report.summary()


def test_missing_tensor_is_named(tmp_path):
    state = reference_state()
    del state["model.diffusion_model.1.bias"]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: model\.diffusion_model\.1\.bias"):
        weights.load_checkpoint(Toy(), tmp_path / "m.safetensors")


def test_wrong_shape_is_named(tmp_path):
    state = reference_state()
    state["first_stage_model.weight"] = torch.zeros(3, 9)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"first_stage_model\.weight \(checkpoint \[3, 9\], model \[3, 8\]\)"
    ):
        weights.load_checkpoint(Toy(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="different shape"):  # even when not strict
        weights.load_checkpoint(Toy(), tmp_path / "m.safetensors", strict=False)


def test_unknown_key_is_named_and_all_problems_in_one_error():
    state = reference_state()
    state["model.diffusion_model.2.weight"] = torch.zeros(1)
    del state["alphas_cumprod"]
    with pytest.raises(CheckpointError) as err:
        weights.apply_state_dict(Toy(), state)
    msg = str(err.value)
    assert "1 unknown: model.diffusion_model.2.weight" in msg and "1 missing: alphas_cumprod" in msg
    assert "\n" not in msg


def test_not_strict_reports_instead_of_raising():
    state = reference_state()
    state["extra.key"] = torch.zeros(1)
    del state["first_stage_model.bias"]
    model = Toy()
    report = weights.apply_state_dict(model, state, strict=False)
    assert report.missing == ["first_stage_model.bias"] and report.unexpected == ["extra.key"]
    assert report.loaded == len(state) - 1


def test_long_lists_are_truncated():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(40)])
    with pytest.raises(CheckpointError, match=r"80 missing: 0\.weight, .*, \.\.\. and 68 more") as err:
        weights.apply_state_dict(model, {})
    assert len(str(err.value)) < 1200


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_files_are_one_paragraph(tmp_path, suffix, damage):
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file(reference_state(), str(path))
    else:
        torch.save(reference_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupted|cannot read|refusing") as err:
        weights.load_state_dict_file(path, unsafe_pickle=True)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        weights.load_state_dict_file("/nonexistent/model.safetensors")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], str(tmp_path / "m.pt"))
    with pytest.raises(CheckpointError, match="not a state dict"):
        weights.load_state_dict_file(tmp_path / "m.pt", unsafe_pickle=True)


def test_tiny_model_roundtrip_fp16(tmp_path, tiny_model):
    from sd.model import load_model

    state = {k: v.detach().half().contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    other = load_model("tiny", seed=2)
    report = weights.load_checkpoint(other, tmp_path / "tiny.safetensors")
    assert report.loaded == len(state)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, state[k].float(), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path, bad):
    state = reference_state()
    bad_keys = list(state)[2:]  # two bad tensors: the first one in file order is named
    for key in bad_keys:
        state[key].view(-1)[0] = bad
    save_file(state, str(tmp_path / "m.safetensors"))
    first_bad = next(k for k in weights.load_state_dict_file(tmp_path / "m.safetensors") if k in bad_keys)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        weights.load_checkpoint(model, tmp_path / "m.safetensors")
    message = str(err.value)
    assert f"checkpoint tensor {first_bad!r} holds non-finite values" in message and "another copy" in message
    assert ("1 NaN" if bad != bad else "1 inf") in message
    for key, value in model.state_dict().items():  # nothing was copied in
        assert torch.equal(value, before[key]), key


class RunsCode:
    """Unpickling this calls os.system: what a malicious .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickle_that_runs_code_is_refused_as_such(tmp_path, container):
    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    obj = {"state_dict": reference_state(), "hook": RunsCode(marker)}
    if container == "torch.save":
        torch.save(obj, str(path))
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))  # STACK_GLOBAL, not GLOBAL
    with pytest.raises(CheckpointError) as err:
        weights.load_state_dict_file(path)
    message = str(err.value)
    assert "tries to execute code when unpickled" in message and f"{os.system.__module__}.system" in message
    assert ".safetensors" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.skipif(not weights.torch_load_has_weights_only(), reason="needs torch.load(weights_only=)")
def test_truncated_ckpt_keeps_the_truncated_message(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save(reference_state(), str(path))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="probably truncated or corrupted"):
        weights.load_state_dict_file(path)


def test_fused_projections_load_the_original_keys():
    from sd.attention import CrossAttention, attend_original

    torch.manual_seed(0)
    source = CrossAttention(16, None, heads=2, dim_head=8, attend=attend_original)
    fused = CrossAttention(16, None, heads=2, dim_head=8, attend=attend_original)
    fused.fuse_projections()
    weights.apply_state_dict(fused, source.state_dict())  # writes through the split views
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(fused(x), source(x), atol=1e-6, rtol=1e-6)
