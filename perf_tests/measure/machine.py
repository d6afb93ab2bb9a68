"""The environment a run came from, for pytest-benchmark's ``machine_info`` (the keys the comparator and
baselines read).

Baselines are kept per device (``baselines/<device_slug>/<env>-<profile>.json``), so the slug must be
stable and filesystem-safe; everything else is recorded so a later reader can tell two runs apart.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess

from perf_tests.records.names import env_label


def slugify(text: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'nvidia-a100-sxm4-80gb'; '(R)', '(TM)' and '@ 2.20GHz' dropped."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"@.*$", "", text)  # clock speed is not the device
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_id(machine_id_file: str = "/etc/machine-id",
               boot_id_file: str = "/proc/sys/kernel/random/boot_id") -> str:
    """12 hex chars naming this machine in this boot (not its type): sha256 of /etc/machine-id (or, without
    one, the hostname), the hostname and the kernel's boot id where it has one. Runs on different machines
    of one device type differ by more than runs on one machine; the comparator needs to know which is which.
    The boot counts because VMs cloned from one image share machine-id and hostname, and a VM booted again
    may run on another host (docs/design-notes.md). A baseline recorded before a reboot is from another
    machine."""
    host = socket.gethostname()
    parts = []
    for path, fallback in ((machine_id_file, host), (boot_id_file, "")):
        try:
            with open(path) as f:
                parts.append(f.read().strip() or fallback)
        except OSError:
            parts.append(fallback)
    return hashlib.sha256(f"{parts[0]}\n{host}\n{parts[1]}".encode()).hexdigest()[:12]


def host_id(machine_id_file: str = "/etc/machine-id") -> str:
    """12 hex chars naming this host across its boots: :func:`machine_id` without the boot id. VMs cloned
    from one image share it, and a VM booted again may run on other hardware, so runs of another boot of
    one host are judged as the same machine only when their canaries agree (docs/store.md)."""
    host = socket.gethostname()
    try:
        with open(machine_id_file) as f:
            mid = f.read().strip() or host
    except OSError:
        mid = host
    return hashlib.sha256(f"{mid}\n{host}".encode()).hexdigest()[:12]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(cwd: str | None = None) -> str | None:
    """The commit the tree is at (read-only git call); '+dirty' when tracked files are modified."""
    sha = _run(["git", "rev-parse", "HEAD"], cwd)
    if sha is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    return sha + ("+dirty" if dirty else "")


def device_identity(device: str) -> tuple[str, str]:
    """(device name, device slug) of "cpu" or "cuda[:i]": the GPU name, or the CPU model with "cpu-"."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device).index or 0)
        return name, slugify(name)
    cpu = cpu_model()
    return cpu, "cpu-" + slugify(cpu)


def machine_info(device: str, repo_root: str | None = None) -> dict:
    """The machine_info keys for ``device`` ("cpu" or "cuda[:i]")."""
    import torch

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    cpu = cpu_model()
    info = {
        "device_type": device_type,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver_version": None,
        "cuda_version": torch.version.cuda,  # the toolkit torch was built with
        "cudnn_version": None,
        "torch_version": torch.__version__,
        "open_clip_version": _version("open_clip_torch"),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(repo_root),
        "env": env_label(torch.__version__),
        "machine_id": machine_id(),
    }
    info["device_name"], info["device_slug"] = device_identity(device)
    if device_type == "cuda":
        index = torch.device(device).index or 0
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["driver_version"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if info["driver_version"]:
            info["driver_version"] = info["driver_version"].splitlines()[0].strip()
        if torch.backends.cudnn.is_available():
            info["cudnn_version"] = torch.backends.cudnn.version()
    return info
