"""perf_tests.measure.machine: the machine_info keys and a stable, filesystem-safe device slug."""

from __future__ import annotations

import re

import pytest

from perf_tests.measure import machine
from perf_tests.records import names

REQUIRED_KEYS = {"device_name", "device_slug", "device_type", "gpu_count", "driver_version", "cuda_version",
                 "cudnn_version", "torch_version", "open_clip_version", "cpu_model", "git_commit", "env",
                 "machine_id"}


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
    ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
    ("Intel(R) Xeon(R) Processor", "intel-xeon-processor"),
    ("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "intel-xeon-cpu-e5-2686-v4"),
    ("AMD EPYC 7R13 Processor", "amd-epyc-7r13-processor"),
    ("", "unknown"),
])
def test_slugify(name, slug):
    assert machine.slugify(name) == slug


def test_env_label():
    assert names.env_label("1.12.1+cu102") == "torch1"
    assert names.env_label("2.14.1+cu130") == "torch2"
    assert names.env_label("2.0.0.dev20230111+cu117") == "torch20"


def test_cpu_machine_info_has_the_required_keys():
    info = machine.machine_info("cpu")
    assert REQUIRED_KEYS <= set(info)
    assert info["device_type"] == "cpu"
    assert info["device_slug"].startswith("cpu-")
    assert re.fullmatch(r"[a-z0-9-]+", info["device_slug"])
    assert info["env"] in ("torch1", "torch20", "torch2")


def test_machine_id_is_stable_and_names_the_machine(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{12}", machine.machine_id())
    assert machine.machine_id() == machine.machine_id()
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("0123456789abcdef\n")
    b.write_text("fedcba9876543210\n")
    assert machine.machine_id(str(a)) != machine.machine_id(str(b))
    assert re.fullmatch(r"[0-9a-f]{12}", machine.machine_id(str(tmp_path / "missing")))
    # a clone of one image (same machine-id and hostname) booted elsewhere is another machine
    boot1, boot2 = tmp_path / "boot1", tmp_path / "boot2"
    boot1.write_text("5725502f-10be-4a38-a759-c8c98132e1b7\n")
    boot2.write_text("0c6b7d1e-2f3a-4b5c-8d9e-0a1b2c3d4e5f\n")
    assert machine.machine_id(str(a), str(boot1)) != machine.machine_id(str(a), str(boot2))
    assert machine.machine_id(str(a), str(boot1)) == machine.machine_id(str(a), str(boot1))
