"""sd.compile: refusals without torch.compile, and one fullgraph compile that never recompiles over steps."""

from __future__ import annotations

import pytest
from conftest import micro_config

from sd import capabilities
from sd.compile import COMPILE_MODES, compile_model
from sd.errors import CompileUnavailable
from sd.model import load_model


def test_modes_have_one_spelling():
    # The same names are the CLI values, the case ids and the baseline keys; torch's names stay inside.
    assert COMPILE_MODES == ("eager", "compile", "compile-max-autotune", "compile-reduce-overhead")


def test_no_torch_compile_is_a_clear_error(monkeypatch, tiny_config):
    monkeypatch.setattr(capabilities, "has_compile", lambda: False)
    model = load_model(tiny_config, device="meta")
    with pytest.raises(CompileUnavailable) as exc:
        compile_model(model)
    assert "torch.compile" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.skipif(not capabilities.has_compile(), reason="torch.compile needs PyTorch 2")
def test_unknown_mode_is_refused(tiny_config):
    with pytest.raises(CompileUnavailable) as exc:
        compile_model(load_model(tiny_config, device="meta"), "fast")
    assert "compile, compile-max-autotune, compile-reduce-overhead" in str(exc.value)
    with pytest.raises(CompileUnavailable):  # torch's own spelling is not ours
        compile_model(load_model(tiny_config, device="meta"), "default")


@pytest.mark.skipif(not capabilities.has_compile(), reason="torch.compile needs PyTorch 2")
def test_compile_model_wraps_without_renaming_weights(tiny_config):
    model = load_model(tiny_config, device="meta")
    keys = list(model.state_dict())
    assert compile_model(model, "compile-reduce-overhead", vae=True) is model  # compiling itself is lazy
    assert model.compile_mode == "compile-reduce-overhead" and model.unet.clone_outputs
    assert "denoise" in vars(model.unet) and "forward" in vars(model.vae.decoder)
    assert "forward" not in vars(model.vae.encoder)
    assert list(model.state_dict()) == keys
    with pytest.raises(CompileUnavailable):
        compile_model(model)


@pytest.mark.slow
@pytest.mark.skipif(not capabilities.has_compile(), reason="torch.compile needs PyTorch 2")
@pytest.mark.parametrize(
    "attention, fuse", [("original", False), ("sdpa-flash", False), ("sdpa-flash", True)]
)
def test_unet_compiles_fullgraph_once_for_all_timesteps(tiny_config, attention, fuse):
    import torch._dynamo
    from torch._dynamo.utils import counters

    if capabilities.sdpa_kernel_missing("flash") and attention != "original":
        pytest.skip("no SDPA kernel selection in this PyTorch")
    torch._dynamo.reset()
    counters.clear()
    # ~1/3 of the tiny graph: fast to compile
    model = load_model(micro_config(tiny_config), attention=attention, fuse_projections=fuse)
    keys = list(model.state_dict())
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 256)
    steps = [999, 981.0, torch.tensor(500), torch.tensor([480, 480]), torch.tensor([1.5, 1.5])]
    with torch.no_grad():
        eager = [model.unet(x, t, c) for t in steps]
        compile_model(model)
        # fullgraph=True: any graph break raises; error_on_recompile: so does any new graph after the first.
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = [model.unet(x, t, c) for t in steps]
    assert counters["stats"]["unique_graphs"] == 1
    assert list(model.state_dict()) == keys and model.compile_mode == "compile"
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(capabilities.sdpa_kernel_missing("math") is not None, reason="no SDPA kernel selection")
@pytest.mark.parametrize("traceable", [True, False])
def test_a_kernel_context_compile_cannot_trace_is_held_around_the_compiled_call(monkeypatch, tiny_config,
                                                                                 traceable):
    """PyTorch 2.0's torch.backends.cuda.sdp_kernel cannot be traced: the compiled UNet is called inside it
    (its graph traced there), and the kernel's own `with` is skipped while compiling. Here a recording
    context stands for the kernel's and an eager pass for the compiled function."""
    import contextlib

    import torch

    import sd.compile

    events = []

    @contextlib.contextmanager
    def kernel():
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(capabilities, "sdpa_kernel_context", lambda name: kernel)
    monkeypatch.setattr(capabilities, "sdpa_kernel_context_traceable", lambda: traceable)

    def fake_compile(fn, mode):
        def compiled(*args):
            events.append("compiled call")
            return fn(*args)
        return compiled

    monkeypatch.setattr(sd.compile, "compile_fn", fake_compile)
    model = load_model(micro_config(tiny_config), attention="sdpa-math")
    compile_model(model)
    events.clear()  # the backend's probe at build ran the kernel once
    with torch.no_grad():
        model.unet(torch.randn(1, 4, 16, 16), 999, torch.randn(1, 77, 256))
    attention_calls = events.count("enter") - (0 if traceable else 1)
    assert attention_calls > 0 and events.count("enter") == events.count("exit")
    if traceable:  # each attention call holds its own context; the compiled call is not wrapped
        assert events[0] == "compiled call"
    else:
        assert events[:2] == ["enter", "compiled call"] and events[-1] == "exit"
