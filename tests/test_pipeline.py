"""txt2img on the tiny preset at 64x64: shapes, PNGs, seeding, precision checks, the random-weights
warning."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sd.pipeline as P
from sd.errors import ConfigError, SDError
from sd.model import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model  # read-only, shared with other test files


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(P.Sampling)}


def run(model, outdir=None, grid=False, **kw):
    kw = {"steps": 3, "height": 64, "width": 64, "sampler": "ddim", "progress": False, **kw}
    prompts = kw.pop("prompts", ["a cat", "a dog"])
    sampling = P.Sampling(**{k: kw.pop(k) for k in list(kw) if k in SAMPLING_FIELDS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", P.RandomWeightsWarning)
        images = P.txt2img(model, prompts, sampling, **kw)
    if outdir is not None:
        P.write_images(images, outdir, grid_nrow=len(images) if grid else None)
    return images


def test_images_and_pngs(tiny, tmp_path):
    images = run(tiny, outdir=tmp_path, grid=True)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00000.png", "00001.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "samples" / "00001.png")), images[1])
    assert Image.open(tmp_path / "grid-0000.png").size == (2 * 66 + 2, 66 + 2)
    run(tiny, prompts="a cat", outdir=tmp_path)  # numbering continues, as the original
    assert (tmp_path / "samples" / "00002.png").exists()


def test_seeded_and_deterministic(tiny):
    a = run(tiny, seed=5)
    assert np.array_equal(a, run(tiny, seed=5))
    assert not np.array_equal(a, run(tiny, seed=6))


def test_x_T_from_a_cpu_generator_shared_with_the_sampler(tiny, monkeypatch):
    """x_T = torch.randn on a CPU generator seeded with `seed`; the sampler draws from the same stream,
    so the second iteration's x_T follows the first's sampler draws (as the original's global RNG)."""
    seen = []

    def fake_sample(model, sampler, steps, cond, uncond, scale, x_T, eta=0.0, generator=None, callback=None):
        seen.append((x_T.clone(), cond.shape, None if uncond is None else uncond.shape))
        for _ in range(steps):
            torch.randn(x_T.shape, generator=generator)
            callback({"i": 0})
        return x_T

    monkeypatch.setattr(P, "sample", fake_sample)
    run(tiny, seed=11, n_iter=2, prompts=["a", "b", "c"])
    g = torch.Generator().manual_seed(11)
    first = torch.randn((3, 4, 8, 8), generator=g)
    for _ in range(3):
        torch.randn((3, 4, 8, 8), generator=g)
    second = torch.randn((3, 4, 8, 8), generator=g)
    assert torch.equal(seen[0][0], first) and torch.equal(seen[1][0], second)
    assert seen[0][1] == (3, 77, 256) and seen[0][2] == (3, 77, 256)
    run(tiny, guidance_scale=1.0)
    assert seen[-1][2] is None  # no unconditional pass when guidance is off


def test_decode_latents_and_to_uint8_truncate_like_the_original(tiny):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = tiny.decode_latents(z)
        raw = tiny.vae.decode(z / tiny.scale_factor)
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(image, ((raw + 1) / 2).clamp(0, 1), atol=0, rtol=0)
    x = torch.tensor([0.0, 0.0, 0.5, 0.9995, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert P.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255]


def test_image_grid_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    ref = torchvision.utils.make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=2)
    np.testing.assert_array_equal(P.image_grid(images, 2), ref.permute(1, 2, 0).numpy())


def test_random_weights_warning_once_per_model(tiny):
    model = load_model("tiny", seed=3)
    with pytest.warns(P.RandomWeightsWarning, match="RANDOM WEIGHTS") as record:
        P.txt2img(model, "x", P.Sampling("ddim", steps=2), height=64, width=64, progress=False)
        P.txt2img(model, "x", P.Sampling("ddim", steps=2), height=64, width=64, progress=False)
    assert sum(issubclass(w.category, P.RandomWeightsWarning) for w in record) == 1


def test_no_warning_with_a_checkpoint():
    model = load_model("tiny", seed=4)
    model.checkpoint = "model.safetensors"  # what load_model records when given a ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.RandomWeightsWarning)
        P.txt2img(model, "x", P.Sampling("ddim", steps=2), height=64, width=64, progress=False)


def test_precision_must_match_the_model(tiny):
    with pytest.raises(ConfigError, match=r"precision 'fp16' needs a float16 model but this one is float32"):
        run(tiny, precision="fp16")
    with pytest.raises(ConfigError, match="unknown precision"):
        run(tiny, precision="half")
    assert P.precision_dtype("autocast") == torch.float32 and P.precision_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("height", [96, 0, -64])
def test_bad_sizes_are_refused_never_defaulted(tiny, height):
    with pytest.raises(SDError, match=f"positive multiple of 64 for this model, got {height}"):
        run(tiny, height=height)


def test_bad_arguments(tiny):
    with pytest.raises(SDError, match="unknown sampler"):
        run(tiny, sampler="euler")
    with pytest.raises(SDError, match="at least one prompt"):
        run(tiny, prompts=[])


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_low_precision_runs(tiny, precision):
    model = tiny if precision == "autocast" else load_model("tiny", seed=0, dtype=torch.bfloat16)
    ref = run(tiny, steps=2, prompts="a cat")
    images = run(model, steps=2, prompts="a cat", precision=precision)
    assert images.shape == ref.shape
    # Same model and noise: the low-precision images stay close to the fp32 ones.
    assert np.abs(images.astype(float) - ref.astype(float)).mean() < 12


def test_progress_bar_counts_sampler_steps(tiny, capsys):
    run(tiny, steps=4, sampler="plms", progress=True, prompts="a")
    err = capsys.readouterr().err
    assert "txt2img plms" in err and "4/4" in err
