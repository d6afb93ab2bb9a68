"""The canary: a fixed workload that does not depend on the code under test, timed between the cases.

A matmul and a 3x3 convolution of fixed sizes in plain torch, on the run's device and dtype. Its time
moves when the machine does (another job on the cores, a throttled clock, a new PyTorch or driver), never
because the code under test changed, so a comparator can tell a disturbed run from slower code (issue 8,
item 5). One measurement is one untimed call, then a block of ``calls`` calls closed by one device
synchronisation (about 20-50 ms), reported as per-call seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from perf_tests.timing import sync


@dataclass(frozen=True)
class CanarySize:
    matmul: int  # (n, n) @ (n, n)
    conv: tuple[int, int, int, int]  # (N, C, H, W) input of a 3x3, C -> C convolution
    calls: int  # per measurement


# A few milliseconds per call on one CPU core; a fraction of a millisecond on an A100/H100 in fp16.
SIZES = {
    "cpu": CanarySize(matmul=256, conv=(1, 32, 64, 64), calls=8),
    "cuda": CanarySize(matmul=4096, conv=(8, 256, 64, 64), calls=60),
}


class Canary:
    def __init__(self, device: str, dtype: torch.dtype):
        self.device = device
        device_type = torch.device(device).type
        self.size = SIZES.get(device_type, SIZES["cpu"])
        n, (b, c, h, w) = self.size.matmul, self.size.conv
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.x = torch.randn(b, c, h, w, generator=g).to(device, dtype)
        self.weight = (torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)).to(device, dtype)
        dtype_name = str(dtype).replace("torch.", "")
        self.workload = (f"matmul {n}x{n}x{n} + conv2d {b}x{c}x{h}x{w} 3x3 {c}->{c}, {dtype_name}, "
                         f"{device_type}, {self.size.calls} calls per measurement")

    def _call(self) -> None:
        with torch.no_grad():
            torch.mm(self.a, self.b)
            torch.nn.functional.conv2d(self.x, self.weight, padding=1)

    def measure(self) -> float:
        """One measurement: per-call seconds of a block of calls (after one untimed call)."""
        self._call()
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.size.calls):
            self._call()
        sync(self.device)
        return (time.perf_counter() - t0) / self.size.calls
