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


def _decomposition_flops() -> dict:
    """Textbook flop counts of the dense decompositions (Golub & Van Loan, *Matrix
    Computations*, 4th ed., §5.2 and §8.6), which ``torch.utils.flop_counter`` leaves
    uncounted: thin SVD with both vector sets ``6mn² + 20n³`` (R-SVD, ``m ≥ n``), symmetric
    eigendecomposition with vectors ``9n³``, thin Householder QR with ``Q`` ``4mn² − 4n³/3``;
    and the in-place ``addmm_``/``baddbmm_``, as their out-of-place forms."""
    import math

    aten = torch.ops.aten

    def batch(shape) -> int:
        return math.prod(shape[:-2])

    def svd(a_shape, *args, **kwargs) -> int:
        m, n = max(a_shape[-2:]), min(a_shape[-2:])
        return batch(a_shape) * (6 * m * n * n + 20 * n**3)

    def eigh(a_shape, *args, **kwargs) -> int:
        return batch(a_shape) * 9 * a_shape[-1] ** 3

    def qr(a_shape, *args, **kwargs) -> int:
        m, n = max(a_shape[-2:]), min(a_shape[-2:])
        return batch(a_shape) * (4 * m * n * n - 4 * n**3 // 3)

    # the in-place products (``S.addmm_(a, b)``) are separate ops that flop_counter leaves
    # uncounted; they cost what their out-of-place twins do (2 flops per multiply-add)
    def addmm_(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def baddbmm_(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    return {aten._linalg_svd: svd, aten._linalg_eigh: eigh, aten.linalg_qr: qr,
            aten.addmm_: addmm_, aten.baddbmm_: baddbmm_}


class Work:
    """Floating-point operations of a call, by dtype: every matmul, convolution and
    attention (``torch.utils.flop_counter``) and the dense decompositions (textbook counts,
    :func:`_decomposition_flops`). ``floor(rates)`` is the time they take at the machine's
    matmul rate of their dtype, a lower bound on the call's time.

        work = Work.of(lambda: fit(...))
        work.floor({torch.float32: 343e9, torch.float64: 110e9})
    """

    def __init__(self, flops: dict[torch.dtype, float]) -> None:
        self.flops = dict(flops)

    @classmethod
    def of(cls, fn) -> Work:
        from torch.utils._pytree import tree_leaves
        from torch.utils.flop_counter import FlopCounterMode

        by_dtype: dict[torch.dtype, float] = {}

        class Counter(FlopCounterMode):
            def _count_flops(self, func_packet, out, args, kwargs):
                before = self.get_total_flops()
                result = super()._count_flops(func_packet, out, args, kwargs)
                added = self.get_total_flops() - before
                if added:
                    dtype = next(t.dtype for t in tree_leaves(args)
                                 if isinstance(t, torch.Tensor) and t.is_floating_point())
                    by_dtype[dtype] = by_dtype.get(dtype, 0) + added
                return result

        with Counter(display=False, custom_mapping=_decomposition_flops()):
            fn()
        return cls(by_dtype)

    def __mul__(self, scale: float) -> Work:
        return Work({k: v * scale for k, v in self.flops.items()})

    __rmul__ = __mul__

    def __sub__(self, other: Work) -> Work:
        keys = set(self.flops) | set(other.flops)
        return Work({k: self.flops.get(k, 0) - other.flops.get(k, 0) for k in keys})

    def __add__(self, other: Work) -> Work:
        keys = set(self.flops) | set(other.flops)
        return Work({k: self.flops.get(k, 0) + other.flops.get(k, 0) for k in keys})

    @property
    def total(self) -> float:
        return sum(self.flops.values())

    def floor(self, rates: dict[torch.dtype, float]) -> float:
        """Seconds at ``rates`` (FLOP/s by dtype; float16/bfloat16 at the float32 rate)."""
        return sum(v / rates.get(k, rates[torch.float32]) for k, v in self.flops.items())

    def __repr__(self) -> str:
        parts = ", ".join(f"{str(k).removeprefix('torch.')} {v / 1e12:.2f}"
                          for k, v in sorted(self.flops.items(), key=lambda kv: str(kv[0])))
        return f"Work({parts} TFLOP)"
