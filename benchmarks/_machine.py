"""What every benchmark prints beside its figures: the machine's matmul rate and peak memory,
measured in the same run, so that a slower machine can be told from a slower library."""

from __future__ import annotations

import resource
import time

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of an ``n×n`` matmul in ``dtype`` (GFLOP/s)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine_line() -> str:
    """``torch …, N threads; matmul 2048²: float64 … GFLOP/s, float32 … GFLOP/s``."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul 2048²: "
        f"float64 {matmul_gflops(torch.float64):.0f} GFLOP/s, "
        f"float32 {matmul_gflops(torch.float32):.0f} GFLOP/s"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
