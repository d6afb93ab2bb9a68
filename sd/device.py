"""What a device offers with the installed PyTorch: the attention backends that run there (decided by a
real call, see :mod:`sd.attention`), ``torch.compile`` and bf16, probed once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sd.attention import available_attention
from sd.capabilities import has_compile


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device offers with the installed PyTorch: the one probe the suite and the tests share."""

    device_type: str  # "cpu" | "cuda" | ...
    attention: Mapping[str, str | None]  # backend -> None if it runs here, else the reason
    has_compile: bool
    torch_version: str
    bf16: bool = True
    cuda_capability: tuple[int, int] | None = None


def probe_device(device: torch.device | str = "cpu") -> DeviceCapabilities:
    """Probe `device` once: attention backends (by a real call, see sd.attention), torch.compile, bf16."""
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    return DeviceCapabilities(
        device_type=device.type,
        attention=available_attention(device),
        has_compile=has_compile(),
        torch_version=torch.__version__,
        bf16=torch.cuda.is_bf16_supported() if is_cuda else True,
        cuda_capability=torch.cuda.get_device_capability(device) if is_cuda else None,
    )
