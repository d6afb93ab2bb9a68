"""The canary: a fixed workload that does not depend on the code under test, timed between the cases.

A matmul and a 3x3 convolution of fixed sizes in plain torch, on the run's device and dtype. Its time
moves when the machine does (another job on the cores, a throttled clock, a new PyTorch or driver), never
because the code under test changed, so a comparator can tell a disturbed run from slower code. One
measurement is one untimed call, then a block of ``calls`` calls closed by one device synchronisation
(about 20-50 ms), reported as per-call seconds. Its inputs are on the device only while it runs, so that
they never count in a case's peak memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from perf_tests.measure.timing import sync


@dataclass(frozen=True)
class CanarySize:
    matmul: int  # (n, n) @ (n, n)
    conv: tuple[int, int, int, int]  # (N, C, H, W) input of a 3x3, C -> C convolution
    calls: int  # per measurement


# A few milliseconds per call on one CPU core; a fraction of a millisecond on an A100/H100 in fp16.
SIZES = {
    "cpu": CanarySize(matmul=256, conv=(1, 32, 64, 64), calls=5),
    "cuda": CanarySize(matmul=4096, conv=(8, 256, 64, 64), calls=60),
}


class Canary:
    def __init__(self, device: str, dtype: torch.dtype):
        self.device = device
        device_type = torch.device(device).type
        self.size = SIZES.get(device_type, SIZES["cpu"])
        n, (b, c, h, w) = self.size.matmul, self.size.conv
        g = torch.Generator().manual_seed(0)
        self.dtype = dtype
        # a, b of the matmul; x, weight of the convolution (kept on the CPU between measurements)
        self.inputs = (torch.randn(n, n, generator=g), torch.randn(n, n, generator=g),
                       torch.randn(b, c, h, w, generator=g), torch.randn(c, c, 3, 3,
                                                                         generator=g) / (3 * c**0.5))
        dtype_name = str(dtype).replace("torch.", "")
        self.workload = (f"matmul {n}x{n}x{n} + conv2d {b}x{c}x{h}x{w} 3x3 {c}->{c}, {dtype_name}, "
                         f"{device_type}, {self.size.calls} calls per measurement")

    def measure(self) -> float:
        """One measurement: per-call seconds of a block of calls (after one untimed call)."""
        a, b, x, weight = (t.to(self.device, self.dtype) for t in self.inputs)

        def call():
            torch.mm(a, b)
            torch.nn.functional.conv2d(x, weight, padding=1)

        with torch.no_grad():
            call()
            sync(self.device)
            t0 = time.perf_counter()
            for _ in range(self.size.calls):
                call()
            sync(self.device)
            return (time.perf_counter() - t0) / self.size.calls
