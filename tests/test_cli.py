"""`python -m sd`: txt2img writes PNGs; every SDError is one `error:` line with exit status 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd import capabilities
from sd.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::sd.pipeline.RandomWeightsWarning")


def test_txt2img_writes_pngs(tmp_path, capsys):
    rc = main(
        [
            "txt2img",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--H",
            "64",
            "--W",
            "64",
            "--n-samples",
            "2",
            "--sampler",
            "dpm",
            "--outdir",
            str(tmp_path),
            "--grid",
            "--quiet",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    assert Image.open(tmp_path / "samples" / "00001.png").size == (64, 64)
    assert (tmp_path / "grid-0000.png").exists()
    assert "wrote 2 image(s) 64x64" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "/nonexistent/model.safetensors"], "does not exist"),
        (["--attention", "xformers"], "cannot run here"),
        (["--steps", "2000"], "steps must be between 1 and 500"),
        (["--H", "100"], "height must be a positive multiple of 64 for this model, got 100: pass e.g. 64"),
        (["--H", "0"], "height must be a positive multiple of 64 for this model, got 0"),
        (["--H", "-64"], "height must be a positive multiple of 64 for this model, got -64"),
        (["--W", "0"], "width must be a positive multiple of 64 for this model, got 0"),
        (["--steps", "0"], "--steps 0: the number of sampler steps must be at least 1"),
        (["--n-samples", "0"], "--n-samples 0: the number of images per batch must be at least 1"),
        (["--n-iter", "0"], "--n-iter 0: the number of batches must be at least 1"),
    ],
)
def test_errors_are_one_paragraph_exit_2(tmp_path, capsys, extra, message):
    rc = main(
        [
            "txt2img",
            "--preset",
            "tiny",
            "--H",
            "64",
            "--W",
            "64",
            "--quiet",
            "--outdir",
            str(tmp_path),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in err


@pytest.mark.skipif(capabilities.has_compile(), reason="this PyTorch has torch.compile")
def test_compile_unavailable_on_old_torch(tmp_path, capsys):
    rc = main(["txt2img", "--preset", "tiny", "--compile", "--outdir", str(tmp_path)])
    assert rc == 2 and "error: torch.compile is not available" in capsys.readouterr().err


def test_attention_lists_every_backend(capsys):
    assert main(["attention"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["original", "available"]
    assert "xformers" in out


def test_python_dash_m_entry_point_error_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sd", "txt2img", "--preset", "tiny", "--ckpt", str(tmp_path / "missing.ckpt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["txt2img", "--preset", "tiny", "--config", "x.yaml"])
    assert exit_info.value.code == 2


def bad_checkpoints(tmp_path, tiny_model) -> dict[str, tuple[Path, str]]:
    """Each bad file a user may hold, written here, with the message the CLI must give for it."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {k: v.detach().clone().contiguous() for k, v in tiny_model.state_dict().items()}
    first = next(iter(state))
    state[first].view(-1)[0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    safetensors_torch.save_file(state, str(nan_path))
    evil_path = tmp_path / "evil.ckpt"
    evil_path.write_bytes(pickle.dumps({"state_dict": RunsCode()}))
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(1000)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    return {
        "nan": (nan_path, f"checkpoint tensor {first!r} holds non-finite values"),
        "evil": (evil_path, "tries to execute code when unpickled"),
        "truncated": (truncated, "probably truncated or corrupted"),
    }


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran",))


@pytest.mark.parametrize("bad", ["nan", "evil", "truncated"])
def test_bad_checkpoints_exit_2(tmp_path, capsys, tiny_model, bad):
    path, message = bad_checkpoints(tmp_path, tiny_model)[bad]
    rc = main(["txt2img", "--preset", "tiny", "--ckpt", str(path), "--quiet", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err


def test_fused_channels_last_run(tmp_path, capsys):
    args = ["txt2img", "--preset", "tiny", "--steps", "2", "--H", "64", "--W", "64", "--sampler", "ddim"]
    rc = main([*args, "--fuse-projections", "--channels-last", "--quiet", "--outdir", str(tmp_path)])
    assert rc == 0 and "wrote 1 image(s) 64x64" in capsys.readouterr().err
