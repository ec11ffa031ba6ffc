"""Timing shared by the benchmarks: interleaved medians in one process, and the GEMM peak that
"fraction of peak" divides by (docs/design.md section 5)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["PEAK_N", "interleaved_medians", "peak_gemm", "peak_flops"]

PEAK_N = 2048
"""Size of the square GEMM whose FLOP/s is the peak."""


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2,
                        min_time: float = 0.0, cpu: bool = False) -> dict:
    """Median seconds per call of each fn, timing them round-robin so drift hits all alike. With
    ``cpu``, (median wall seconds, median CPU seconds of every thread of this process) per fn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu_s: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    while r < reps or time.perf_counter() - start < min_time:
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu_s[k].append(time.process_time() - c0)
        r += 1
    if cpu:
        return {k: (statistics.median(wall[k]), statistics.median(cpu_s[k])) for k in fns}
    return {k: statistics.median(v) for k, v in wall.items()}


def peak_gemm(dtype: torch.dtype, n: int = PEAK_N) -> tuple[Callable[[], object], float]:
    """(a call of an n^3 GEMM as x @ W^T, its FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return (lambda: F.linear(a, b)), 2.0 * n**3


def peak_flops(dtype: torch.dtype, n: int = PEAK_N, reps: int = 5, warmup: int = 2) -> float:
    """FLOP/s of an n^3 GEMM in the layout every nn.Linear uses (x @ W^T). On CPUs without
    native bf16 dot products, torch.mm(a, b) in bf16 takes a path ~50x slower than x @ W^T, which
    would flatter every bf16 figure; the layout layers actually use is the fair peak."""
    fn, flops = peak_gemm(dtype, n)
    with torch.inference_mode():
        t = interleaved_medians({"gemm": fn}, reps=reps, warmup=warmup)["gemm"]
    return flops / t
