"""Throughput, MFU and peak memory for every training stage (DEVELOPERS.md "Rules": log images or
tokens/s, MFU and peak memory).

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per sample come from a forward count
(FlopCounterMode, once) times 3 for forward + backward. The peak is `peak_tflops` when configured,
else measured once with a large matmul in the training dtype (a lower bound of the hardware peak,
so this MFU is an upper bound; the metric name says which peak was used).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """CUDA max allocated on GPU; the process RSS high-water mark on CPU."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def forward_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of `fn` (a forward pass), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return float(counter.get_total_flops())


def measured_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5
) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (best of a few runs)."""
    # Its own generator: the global RNG is part of the checkpointed training state.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class Throughput:
    """Samples/s (and tokens/s) over the interval since the last `rates()` call, summed over ranks."""

    def __init__(
        self, world: int, tokens_per_sample: int, flops_per_sample: float, peak_flops_per_worker: float
    ):
        self.world = world
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_sample = flops_per_sample  # forward + backward
        self.peak = peak_flops_per_worker * world
        self._t0 = time.perf_counter()
        self._samples = 0

    def add(self, samples_per_rank: int) -> None:
        self._samples += samples_per_rank * self.world

    def rates(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        per_s = self._samples / dt
        out = {"samples_per_s": per_s, "tokens_per_s": per_s * self.tokens_per_sample}
        if self.flops_per_sample > 0 and self.peak > 0:
            out["mfu"] = per_s * self.flops_per_sample / self.peak
        self._t0, self._samples = now, 0
        return out
