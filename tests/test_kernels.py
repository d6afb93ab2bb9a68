"""perf_tests.measure.kernels: the SDPA kernels a call ran, per model part, from the profiler; and their row
notes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from perf_tests.measure import kernels as K
from perf_tests.report.study import kernel_note
from perf_tests.report.verdict import sentence
from sd.attention import resolve_attention

needs_sdpa = pytest.mark.skipif(
    not hasattr(torch.nn.functional, "scaled_dot_product_attention"), reason="SDPA needs PyTorch 2"
)


def event(name, parent=None, kernels=()):
    e = SimpleNamespace(
        name=name, cpu_parent=parent, cpu_children=[], kernels=[SimpleNamespace(name=k) for k in kernels]
    )
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_classify_names_each_implementation_once_under_its_part():
    unet = event("sd-perf.unet")
    sdpa = event("aten::scaled_dot_product_attention", unet)
    outer = event("aten::_scaled_dot_product_efficient_attention", sdpa)
    inner = event(
        "aten::_efficient_attention_forward", outer, kernels=["fmha_cutlassF_f16_aligned_64x64_rf_sm80"]
    )
    vae = event("sd-perf.vae")
    cudnn = event(
        "aten::_scaled_dot_product_cudnn_attention",
        event("aten::scaled_dot_product_attention", vae),
        kernels=["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"],
    )
    bare = event("aten::_scaled_dot_product_flash_attention")  # no range: the default part
    xf = event("xformers::efficient_attention_forward_cutlass", event("sd-perf.text"))
    events = [unet, sdpa, outer, inner, vae, cudnn, bare, xf, event("aten::softmax", unet)]
    families, device = K.classify(events, default_part="unet")
    assert families == {
        "unet": ["flash", "mem-efficient"],
        "vae": ["cudnn"],
        "text": ["xformers:efficient_attention_forward_cutlass"],
    }
    assert device == {
        "unet": ["fmha_cutlassF_f16_aligned_64x64_rf_sm80"],
        "vae": ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"],
    }


@needs_sdpa
@pytest.mark.parametrize("backend, expected", [("sdpa-math", ["math"]), ("original", None)])
def test_a_cpu_profile_names_the_kernel_that_ran(backend, expected):
    attend = resolve_attention(backend, "cpu", torch.float32)
    q = torch.randn(1, 2, 64, 64)
    found = K.attention_kernels(lambda: attend(q, q, q), "cpu", None)
    assert found["attention_kernels"].get("unet") == expected and found["attention_device_kernels"] is None


@needs_sdpa
def test_plain_sdpa_on_a_cpu_is_one_of_the_cpu_kernels_and_the_parts_are_told_apart():
    class Block(torch.nn.Module):
        def __init__(self, backend):
            super().__init__()
            self.attend = resolve_attention(backend, "cpu", torch.float32)

        def forward(self, x):
            return self.attend(x, x, x)

    unet, vae = Block("sdpa"), Block("sdpa-math")
    x = torch.randn(1, 2, 64, 64)
    found = K.attention_kernels(lambda: vae(unet(x)), "cpu", {"unet": unet, "vae": vae})
    assert found["attention_kernels"]["vae"] == ["math"]
    assert found["attention_kernels"]["unet"][0] in ("flash-cpu", "math")  # PyTorch's choice on this CPU
    assert not unet._forward_pre_hooks and not unet._forward_hooks  # the ranges are gone after the call


@pytest.mark.parametrize(
    "attention, vae, kernels, note",
    [
        ("sdpa", None, {"unet": ["cudnn"], "vae": ["mem-efficient"]}, " <ran cudnn; VAE ran mem-efficient>"),
        ("sdpa", None, {"unet": ["flash"], "vae": ["flash"]}, " <ran flash>"),
        (
            "sdpa-flash",
            "sdpa-mem-efficient",
            {"unet": ["flash"], "vae": ["mem-efficient"]},
            " <VAE ran mem-efficient>",
        ),
        ("sdpa-flash", None, {"unet": ["cudnn"]}, " <ran cudnn>"),  # a forced kernel that did not run: said
        ("sdpa-flash", None, {"unet": ["flash"]}, ""),
        ("sdpa-flash", None, {"unet": ["flash-cpu"]}, ""),  # PyTorch's flash backend on a CPU
        ("original", None, {}, ""),
        ("sdpa", None, None, ""),  # not recorded (older results)
    ],
)
def test_the_row_note_says_which_kernel_ran_where_it_is_not_the_name(attention, vae, kernels, note):
    assert kernel_note(attention, vae, kernels) == note


@pytest.mark.slow
@needs_sdpa
def test_the_suite_records_the_kernels_of_each_part_in_the_result(tmp_path):
    """A real suite run (tiny, sdpa-math): the UNet's and the VAE's kernels reach extra_info, each under
    its part."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "perf_tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "--inductor-cache-dir",
        str(tmp_path / "inductor"),
        "--case-kind",
        "txt2img,unet-step,vae-decode",
        "--attention",
        "sdpa-math",
        "--compile",
        "eager",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--warmup-rounds",
        "1",
        "--canary",
        "off",
        "--benchmark-json",
        str(out),
    ]
    res = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    infos = {b["name"].split("[")[0]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert infos["test_unet_step"]["attention_kernels"] == {"unet": ["math"]}
    assert infos["test_vae_decode"]["attention_kernels"] == {"vae": ["math"]}
    txt2img = infos["test_txt2img"]["attention_kernels"]
    assert (
        txt2img["unet"] == ["math"] and txt2img["vae"] == ["math"] and set(txt2img) <= {"unet", "vae", "text"}
    )


def test_a_change_of_the_kernel_that_ran_blocks_the_time_verdict_and_survives_a_baseline(tmp_path):
    """Baseline: sdpa ran flash; candidate: the same sdpa ran cuDNN (a new cuDNN, another GPU). The time is
    not judged as the code's doing: the verdict says which kernels ran. The kernels go through a baseline
    file unchanged."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from perf_json import CASES, write_run

    from perf_tests.analysis import stats
    from perf_tests.records import baselines as B
    from perf_tests.records import results as R

    sdpa = CASES[2]  # test_unet_step[tiny-sdpa-eager-bs2-fp32]

    def side(label, kernel, seeds):
        paths = [
            write_run(
                tmp_path / f"{label}{s}.json", s, extra={sdpa: {"attention_kernels": {"unet": [kernel]}}}
            )
            for s in seeds
        ]
        return paths

    base_paths, cand_paths = side("b", "flash", (1, 2, 3)), side("c", "cudnn", (4, 5, 6))
    (update,) = B.update_baselines(base_paths, tmp_path / "baselines")
    base = R.side_from_baseline(R.read_baseline(update.path), "baseline")
    assert base.cases[sdpa].unet_kernels == {"flash"}
    verdict = stats.compare(base, R.load_side(cand_paths, "candidate")[0])
    case = next(v for v in verdict.cases if v.name == sdpa)
    assert case.metrics["time"].verdict == stats.INCONCLUSIVE
    (differs,) = [r for r in case.metrics["time"].reasons if r.code == "kernel-differs"]
    assert (differs["baseline"], differs["candidate"]) == ("flash", "cudnn")
    assert "the attention kernel that ran differs: flash vs cudnn" in sentence(differs)
    other = next(v for v in verdict.cases if v.name == CASES[0])  # no kernels recorded: judged as before
    assert "kernel-differs" not in [r.code for r in other.metrics["time"].reasons]
