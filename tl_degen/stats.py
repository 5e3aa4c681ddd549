"""Streaming, mergeable float64 accumulators (DESIGN.md §4 steps 1, 2 and 4).

Every accumulator has ``update`` (one batch), ``merge`` (combine two accumulators, e.g. from
two processes) and read-only results. Results do not depend on how the data was batched
beyond float64 rounding: the mean/Gram accumulator uses the pairwise update of Chan et al.
(the centered sum of outer products is merged, never recovered from raw moments).

**Square-root factors.** Besides the Gram ``XᵀX`` each accumulator keeps a triangular
factor ``R`` with ``RᵀR = XᵀX``: the R of a QR decomposition of the stacked rows, updated
one chunk at a time (``R ← qr([R; chunk]).R``, a streaming TSQR) and merged across batches
and processes as exactly as a sum. Forming ``XᵀX`` squares the condition number: a Gram
eigenvalue at ``1e-13`` of the largest has relative error near ``1e-3`` in float64, while the
singular values of ``R`` give the same eigenvalue to about ``1e-9``
(:func:`tl_degen.basis.whiten`, :func:`tl_degen.basis.lib_rotation` use ``R``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.errors import DataError, NonFiniteError, TLDegenError

__all__ = ["MomentAccumulator", "GramAccumulator", "StochasticEstimate", "EstimateAccumulator",
           "CHUNK_ROWS", "stack_factors", "reusing_buffers"]

#: Rows per matmul when forming sums of outer products (precision, not memory).
CHUNK_ROWS = 512

#: The ``S`` buffer of the last folded :meth:`GramAccumulator.factored_sum`, kept for the
#: next of the same shape while :func:`reusing_buffers` is active (else ``None``).
_spare: list[Tensor] | None = None


@contextmanager
def reusing_buffers() -> Iterator[None]:
    """Inside, a folded :meth:`GramAccumulator.factored_sum`'s ``S`` is kept and zeroed for
    the next one of the same shape instead of allocated afresh: a fresh ``[n, n]`` float64
    buffer is memory the process has not touched, and at ``n`` in the thousands (the MLP's
    ``U′ S U′ᵀ``) its page faults cost more than zeroing used memory. The buffer is let go
    on leaving (nesting: the outermost leaves)."""
    global _spare
    if _spare is not None:
        yield
        return
    _spare = []
    try:
        yield
    finally:
        _spare = None


def _zeros(n: int, device: torch.device) -> Tensor:
    """``[n, n]`` float64 zeros, in the spare buffer when it fits."""
    if _spare:
        buf = _spare.pop()
        if buf.shape == (n, n) and buf.device == device:
            return buf.zero_()
    return torch.zeros(n, n, dtype=torch.float64, device=device)


def stack_factors(*parts: Tensor) -> Float[Tensor, "d d"]:
    """The ``[d, d]`` upper-triangular ``R`` of ``qr(cat(parts))``: ``RᵀR = Σ partᵀ part``.

    Householder QR is backward stable column by column, so ``R`` carries the rows' own
    precision instead of the square of their condition number.
    """
    d = parts[0].shape[1]
    device = parts[0].device
    # rows that are exactly zero add nothing to RᵀR and are left out: a factor of fewer rows
    # than columns is padded with them, and the QR's work grows with its rows, so a few real
    # rows on a wide factor would otherwise cost as much as a full square one
    parts = [p.to(torch.float64) for p in parts if p.shape[0]]
    parts = [p if bool(keep.all()) else p[keep]
             for p, keep in ((p, p.ne(0).any(1)) for p in parts)]
    n = sum(p.shape[0] for p in parts)
    if n == 0:
        return torch.zeros(d, d, dtype=torch.float64, device=device)
    # stacked in column-major order, as LAPACK takes it (no transposed copy inside qr)
    stacked = torch.empty(d, n, dtype=torch.float64, device=device).T
    torch.cat(parts, out=stacked)
    r = torch.linalg.qr(stacked, mode="r").R
    if r.shape[0] < d:  # fewer rows than columns: pad with zero rows
        r = torch.cat([r, r.new_zeros(d - r.shape[0], d)])
    return r


def _check_finite(x: Tensor, what: str) -> None:
    # any NaN or ±Inf makes the sum non-finite: one reduction decides, except where the sum of
    # finite values overflows, which the elementwise test then settles
    if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
        return
    n_bad = (~torch.isfinite(x)).sum().item()
    raise NonFiniteError(f"{n_bad} NaN/Inf value(s) in {what}; check the model's weights "
                         "and dtype (float16 overflows easily), or drop the offending inputs")


class MomentAccumulator:
    """Mean and centered Gram of site vectors (DESIGN.md §4 steps 1-2).

    Rows are site vectors ``[..., d]`` whose last coordinate is the constant (1); every row
    (sample and position) counts once: ``N·P`` rows for ``N`` samples of ``P`` positions.

    Args:
        d: vector dimension, including the constant coordinate if ``has_constant``.
        has_constant: whether the last coordinate is the constant one.
        name: used in error messages.
    """

    def __init__(self, d: int, *, has_constant: bool = True, name: str = "site",
                 device: torch.device | str | None = None):
        self.d, self.has_constant, self.name = d, has_constant, name
        self.count = 0
        self._mean = torch.zeros(d, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(d, d, dtype=torch.float64, device=device)
        self._R = torch.zeros(d, d, dtype=torch.float64, device=device)  # RᵀR = _m2

    def update(self, x: Float[Tensor, "... d"]) -> None:
        """Add a batch of rows (any leading shape)."""
        if x.shape[-1] != self.d:
            raise DataError(f"{self.name}: expected vectors of size {self.d}, got {x.shape[-1]}")
        rows = x.detach().reshape(-1, self.d).to(torch.float64)
        # Chunks of CHUNK_ROWS rows merged pairwise: one long float64 matmul accumulates
        # ~20x more rounding error (it lifts the Gram's noise floor from ~3e-16 to ~7e-15).
        # The factor takes every chunk's rows and Chan terms in one QR: one QR per chunk gives
        # the same R to rounding, with a factorisation and a copy of R for every chunk.
        chunks = []
        for chunk in rows.split(max(CHUNK_ROWS, self.d)):
            mean_b = chunk.mean(0)
            centered = chunk - mean_b
            chunks.append((chunk.shape[0], mean_b, centered.T @ centered, centered))
        # a NaN/Inf anywhere reaches its column's sum of squares: d numbers a chunk checked
        # instead of another pass over every row, before anything is merged
        if not all(bool(torch.isfinite(m2_b.diagonal()).all()) for _, _, m2_b, _ in chunks):
            _check_finite(rows, f"activations at {self.name}")
            raise NonFiniteError(f"activations at {self.name} overflow float64 when squared "
                                 "(|x| > 1e154); check the model's weights and inputs")
        parts = [self._R]
        for n_b, mean_b, m2_b, centered in chunks:
            parts += self._merge_moments(n_b, mean_b, m2_b, centered, factor=False)
        self._R.copy_(stack_factors(*parts))

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Fold ``other`` into this accumulator (in place) and return it."""
        if other.d != self.d:
            raise DataError(f"cannot merge accumulators of size {self.d} and {other.d}")
        if other.count:
            self._merge_moments(other.count, other._mean.to(self._mean.device),
                                other._m2.to(self._m2.device), other._R.to(self._R.device))
        return self

    def reduced(self, shards) -> MomentAccumulator:
        """An accumulator holding every rank's rows: each rank's (count, mean, centered sum,
        factor) merged pairwise in rank order (Chan et al.), as exact as one accumulator fed
        all rows. ``shards`` is a :class:`~tl_degen.distributed.Shards` (``gather``,
        ``sum_ints_each``, ``active``); without a process group this accumulator itself is
        returned, and it is never changed."""
        if not shards.active:
            return self
        counts = shards.sum_ints_each(self.count)
        means, m2s, rs = (shards.gather(t) for t in (self._mean, self._m2, self._R))
        out = MomentAccumulator(self.d, has_constant=self.has_constant, name=self.name,
                                device=self._mean.device)
        for n, mean, m2, r in zip(counts, means, m2s, rs):
            if n:
                out._merge_moments(n, mean, m2, r)
        return out

    def state(self) -> dict[str, Tensor]:
        """The tensors a checkpoint keeps: ``mean``, ``m2``, ``R`` (this accumulator's own,
        not copies) and ``count`` (``[1]``, int64)."""
        return {"mean": self._mean, "m2": self._m2, "R": self._R,
                "count": torch.tensor([self.count])}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Take the entries of :meth:`state` that ``state`` holds (copied in place)."""
        for key, t in (("mean", self._mean), ("m2", self._m2), ("R", self._R)):
            if key in state:
                t.copy_(state[key].to(t))
        if "count" in state:
            self.count = int(state["count"])

    def _merge_moments(self, n_b: int, mean_b: Tensor, m2_b: Tensor, r_b: Tensor,
                       factor: bool = True) -> list[Tensor]:
        """Chan's update, and the same in square-root form: ``r_b`` is any factor with
        ``r_bᵀ r_b = m2_b``. Returns the rows the factor takes (``r_b`` and the scaled mean
        shift); with ``factor=False`` they are left for the caller to stack."""
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        rows = [r_b, (delta * (n_a * n_b / n) ** 0.5)[None]]
        if factor:
            self._R.copy_(stack_factors(self._R, *rows))
        self._mean += delta * (n_b / n)
        self.count = n
        return rows

    def _require_data(self) -> None:
        if self.count == 0:
            raise DataError(f"{self.name}: no data was accumulated; pass at least one batch")

    @property
    def mean(self) -> Float[Tensor, " d"]:
        """``μ`` (its constant entry is 1)."""
        self._require_data()
        return self._mean.clone()

    def gram(self, center: bool = True) -> Float[Tensor, "d d"]:
        """Centered Gram ``G`` (§4 step 2), or the raw second moment if ``center=False``.

        Centering subtracts the mean from every coordinate but the constant one, so the
        centered ``G`` is ``blockdiag(covariance, 1)``.
        """
        self._require_data()
        cov = self._m2 / self.count
        if not center:
            return cov + torch.outer(self._mean, self._mean)
        if not self.has_constant:
            return cov
        g = cov.clone()
        g[-1, :] = 0.0
        g[:, -1] = 0.0
        g[-1, -1] = 1.0
        return g

    def factor(self, center: bool = True) -> Float[Tensor, "r d"]:
        """A square-root factor ``F`` of :meth:`gram`: ``FᵀF = gram(center)``, computed from
        the streaming QR (never from the Gram, see the module docstring)."""
        self._require_data()
        F = self._R / self.count**0.5
        if not center:
            return stack_factors(F, self._mean[None])
        if not self.has_constant:
            return F
        F = F.clone()
        F[:, -1] = 0.0  # the centered constant coordinate is exactly zero
        e = torch.zeros(1, self.d, dtype=torch.float64, device=F.device)
        e[0, -1] = 1.0
        return torch.cat([F, e])

    def __repr__(self) -> str:
        return f"MomentAccumulator({self.name}, d={self.d}, rows={self.count})"


class GramAccumulator:
    """Sum of outer products ``Σ g gᵀ`` over rows, and the number of data rows it averages.

    Used for the Jacobian Gram ``M′`` (DESIGN.md §4 step 4): rows are gradient vectors and
    ``count`` is advanced by ``N·P_in`` per batch (the normaliser of §4 step 4), separately
    from the gradient rows themselves.

    Rows (:meth:`add_rows`) are kept as a square-root factor (streaming QR); blocks that
    arrive already formed (:meth:`add_matrix`, from closed forms whose Gram is summed in
    factored form) are kept as a Gram. Blocks ``U S Uᵀ`` with one ``U`` for many batches
    (:meth:`factored_sum`) sum their ``S`` and are multiplied out once, when the sums are
    read. :meth:`parts` returns both, so the rotation can use the factor where it exists
    (:func:`tl_degen.basis.lib_rotation`).
    """

    def __init__(self, d: int, *, name: str = "site", device: torch.device | str | None = None):
        self.d, self.name = d, name
        self.count = 0
        self._sum = torch.zeros(d, d, dtype=torch.float64, device=device)  # formed blocks
        self._R = torch.zeros(d, d, dtype=torch.float64, device=device)  # RᵀR = Σ rows
        self._pending: tuple | None = None  # (key, (U, ...), Σ S, finish) of U S Uᵀ blocks

    def factored_sum(self, key: tuple, factors: Callable[[], tuple[Tensor, ...]],
                     finish: Callable[[Tensor, tuple[Tensor, ...]], None] | None = None
                     ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(S, factors)``: the running ``S`` (float64, zeros at first) of the blocks
        ``U S Uᵀ`` added under ``key`` (its items compared by identity, e.g. the section and
        its output basis), and the factors ``factors()`` built when the key is new (``U``
        first; the rest kept for the caller until the block is formed). The caller adds its
        batch's symmetric ``S`` into it in place; ``U S Uᵀ`` is formed once, when the sums
        are next read or another key comes, and the factors are then let go. ``finish``
        (given with a new key): ``finish(S, factors)``, a linear map applied to the summed
        ``S`` in place just before it is formed (e.g. a Hadamard product with a fixed
        matrix), so that each batch can add the cheaper unmapped terms."""
        pending = self._pending
        if pending is not None and not (len(pending[0]) == len(key) and all(
                a is b for a, b in zip(pending[0], key))):
            self._fold()
        if self._pending is None:
            built = factors()
            n = built[0].shape[1]
            self._pending = (key, built, _zeros(n, self._sum.device), finish)
        return self._pending[2], self._pending[1]

    def _fold(self) -> None:
        """Form the pending ``U S Uᵀ`` into the formed blocks."""
        if self._pending is None:
            return
        _, built, S, finish = self._pending
        self._pending = None
        if finish is not None:
            finish(S, built)
        U = built[0]
        _check_finite(S, f"Jacobian Gram at {self.name}")
        G = U.double() @ S @ U.double().T
        self._sum += (G + G.T) / 2
        if _spare is not None:
            _spare[:] = [S]

    @property
    def _formed(self) -> Tensor:
        """The formed blocks, pending ones included."""
        self._fold()
        return self._sum

    def add_rows(self, g: Float[Tensor, "... d"]) -> None:
        """Add ``Σ g gᵀ`` over the rows of ``g`` (kept in square-root form)."""
        rows = g.detach().reshape(-1, self.d).to(torch.float64)
        for chunk in rows.split(max(CHUNK_ROWS, 2 * self.d)):
            self._R.copy_(stack_factors(self._R, chunk))  # in place: checkpoints hold it
        # NaN/Inf in any row reach R: check it, not the rows
        _check_finite(self._R, f"Jacobians at {self.name}")

    def add_matrix(self, m: Float[Tensor, "d d"]) -> None:
        """Add an already-formed ``Σ g gᵀ`` block (used by closed-form sections)."""
        _check_finite(m, f"Jacobian Gram at {self.name}")
        self._sum += m.to(torch.float64)

    def add_count(self, n: int) -> None:
        self.count += n

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Fold ``other`` into this accumulator (in place) and return it."""
        if other.d != self.d:
            raise DataError(f"cannot merge accumulators of size {self.d} and {other.d}")
        self._formed.add_(other._formed.to(self._sum.device))
        self._R.copy_(stack_factors(self._R, other._R.to(self._R.device)))
        self.count += other.count
        return self

    def reduced(self, shards) -> GramAccumulator:
        """A new accumulator holding every rank's sums (formed blocks added, factors stacked,
        both in rank order, so every rank holds the same bits); ``shards`` is a
        :class:`~tl_degen.distributed.Shards` (``sum``, ``stack``, ``sum_ints``). This
        accumulator is left as it is, and the result shares no tensor with it."""
        total, r = shards.sum(self._formed), shards.stack(self._R)
        (count,) = shards.sum_ints([self.count])
        return GramAccumulator._of(self.name, total.clone() if total is self._sum else total,
                                   r.clone() if r is self._R else r, count)

    def state(self) -> dict[str, Tensor]:
        """The tensors a checkpoint keeps: ``sum`` (the formed blocks), ``R`` (the rows'
        factor), both this accumulator's own and updated in place, and ``count`` (``[1]``,
        int64)."""
        return {"sum": self._formed, "R": self._R, "count": torch.tensor([self.count])}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Take the entries of :meth:`state` that ``state`` holds (copied in place)."""
        self._pending = None
        for key, t in (("sum", self._sum), ("R", self._R)):
            if key in state:
                t.copy_(state[key].to(t))
        if "count" in state:
            self.count = int(state["count"])

    def plus(self, m: Float[Tensor, "d d"]) -> GramAccumulator:
        """A new accumulator holding these sums and the formed block ``m`` (this one is left
        as it is; the factor is shared, not copied)."""
        _check_finite(m, f"Jacobian Gram at {self.name}")
        return GramAccumulator._of(self.name, self._formed + m.to(torch.float64), self._R,
                                   self.count)

    @staticmethod
    def _of(name: str, total: Tensor, r: Tensor, count: int) -> GramAccumulator:
        out = GramAccumulator.__new__(GramAccumulator)
        out.d, out.name, out.count, out._sum, out._R = r.shape[0], name, count, total, r
        out._pending = None
        return out

    def _require_data(self) -> None:
        if self.count == 0:
            raise DataError(f"{self.name}: no data was accumulated; pass at least one batch")

    @property
    def value(self) -> Float[Tensor, "d d"]:
        """``(1/count) Σ g gᵀ``."""
        self._require_data()
        return (self._formed + self._R.T @ self._R) / self.count

    def parts(self) -> tuple[Float[Tensor, "d d"], Float[Tensor, "d d"] | None]:
        """``(F, G)`` with ``value = FᵀF + G``: ``F`` the rows' factor, ``G`` the formed
        blocks (``None`` when every contribution came as rows)."""
        self._require_data()
        G = self._formed / self.count if bool(self._formed.any()) else None
        return self._R / self.count**0.5, G

    def __repr__(self) -> str:
        return f"GramAccumulator({self.name}, d={self.d}, count={self.count})"


@dataclass
class StochasticEstimate:
    """An estimated matrix (sum over the batch, not yet normalised) and its error.

    ``groups`` holds one estimate per probe group (each already scaled as a full estimate);
    ``value`` is their mean and ``standard_error`` the per-entry standard error of the mean.
    """

    groups: list[Tensor]

    @property
    def value(self) -> Tensor:
        return torch.stack(self.groups).mean(0)

    @property
    def standard_error(self) -> Tensor:
        g = torch.stack(self.groups)
        return g.std(0, unbiased=True) / len(self.groups) ** 0.5

    def standard_error_norm(self) -> float:
        """``‖standard error‖_F``, without forming the per-entry errors: the groups' summed
        squared deviations over ``G (G − 1)``."""
        G = len(self.groups)
        mean = self.value
        sq = sum(float((g - mean).square().sum()) for g in self.groups)
        return (sq / (G * (G - 1))) ** 0.5

    @property
    def relative_error(self) -> float:
        """``‖standard error‖_F / ‖value‖_F``."""
        v = self.value.norm()
        return float(self.standard_error_norm() / v) if v > 0 else 0.0

    def __add__(self, other: StochasticEstimate) -> StochasticEstimate:
        return StochasticEstimate([a + b for a, b in zip(self.groups, other.groups)])


class EstimateAccumulator:
    """A sum over batches known partly exactly and partly by random probes (DESIGN.md §4
    step 9): ``exact + estimate``, and the estimate's error relative to that total.

    The exact part is a :class:`GramAccumulator` (the Jacobian Gram ``M′``, whose count of data
    rows it keeps) or a matrix of sums (an edge matrix, counted here). The estimate is kept as
    one sum per probe group (each a full estimate,
    :attr:`StochasticEstimate.groups`): their mean is the estimate and
    their spread its standard error.

    Everything is summed over this process's batches: :meth:`merged` adds every rank's into a
    new accumulator, and :meth:`state` / :meth:`load_state` are the tensors a checkpoint keeps
    (``sum``, ``R`` for a Gram, ``count``, ``probes.<g>``).

    Args:
        exact: the exact part: a :class:`GramAccumulator`, or the shape of a matrix of sums.
        n_groups: probe groups (0: everything is exact).
        device: where a matrix of sums and the groups live (a Gram's own device otherwise).

    Examples:
        >>> acc = EstimateAccumulator((k_out, k_in), n_groups=4)
        >>> acc.add_exact(edges_of_batch); acc.add_estimate(plan_estimate); acc.add_count(n)
        >>> total = acc.merged(Shards())
        >>> edges, error = total.total() / total.count, total.relative_error()
    """

    def __init__(self, exact: GramAccumulator | tuple[int, int], n_groups: int = 0, *,
                 device: torch.device | str | None = None):
        if isinstance(exact, GramAccumulator):
            self.exact: GramAccumulator | Tensor = exact
            shape, device = (exact.d, exact.d), exact._R.device
        else:
            shape = tuple(exact)
            self.exact = torch.zeros(shape, dtype=torch.float64, device=device)
        self._count = 0
        self.groups = [torch.zeros(shape, dtype=torch.float64, device=device)
                       for _ in range(n_groups)]

    @property
    def _gram(self) -> bool:
        return isinstance(self.exact, GramAccumulator)

    @property
    def count(self) -> int:
        """Data rows the sums run over (the normaliser)."""
        return self.exact.count if self._gram else self._count

    def add_count(self, n: int) -> None:
        if self._gram:
            self.exact.add_count(n)
        else:
            self._count += n

    def add_exact(self, m: Tensor) -> None:
        """Add an exactly computed block (a Gram's rows go to :attr:`exact` directly)."""
        if self._gram:
            self.exact.add_matrix(m)
        else:
            self.exact += m

    def add_estimate(self, estimate) -> None:
        """Add a batch's :class:`StochasticEstimate` (group by group)."""
        if len(estimate.groups) != len(self.groups):
            raise TLDegenError(f"an estimate of {len(estimate.groups)} probe groups does not fit "
                               f"an accumulator of {len(self.groups)}")
        for total, g in zip(self.groups, estimate.groups):
            total += g

    def merged(self, shards, rounds: int = 1) -> EstimateAccumulator:
        """A new accumulator holding every rank's sums (added in rank order through
        ``shards``, a :class:`~tl_degen.distributed.Shards`), the probe groups averaged over
        ``rounds`` passes that each added a full estimate. This one is left as it is."""
        out = EstimateAccumulator.__new__(EstimateAccumulator)
        if self._gram:
            out.exact, out._count = self.exact.reduced(shards), 0
        else:
            total = shards.sum(self.exact)
            out.exact = total.clone() if total is self.exact else total
            (out._count,) = shards.sum_ints([self._count])
        out.groups = [shards.sum(g) / rounds for g in self.groups]
        return out

    @property
    def probed(self) -> bool:
        """Whether any batch was probed (some group is not zero)."""
        return any(bool(g.any()) for g in self.groups)

    def estimate(self):
        """The probed part as a :class:`StochasticEstimate`, or
        ``None`` when no batch was probed."""
        return StochasticEstimate(list(self.groups)) if self.probed else None

    def relative_error(self) -> float:
        """``‖standard error‖_F / ‖exact + estimate‖_F`` (``0.0`` when nothing was probed)."""
        est = self.estimate()
        if est is None:
            return 0.0
        exact = self.exact.value * self.exact.count if self._gram else self.exact
        return float(est.standard_error_norm()
                     / (exact + est.value).norm().clamp_min(1e-300))

    def total(self) -> GramAccumulator | Tensor:
        """``exact + estimate`` as a sum (not normalised), of the exact part's type: a new
        :class:`GramAccumulator` (the estimate as a formed block) or a new matrix; the exact
        part itself when nothing was probed."""
        est = self.estimate()
        if est is None:
            return self.exact
        return self.exact.plus(est.value) if self._gram else self.exact + est.value

    def state(self) -> dict[str, Tensor]:
        """The tensors a checkpoint keeps: the exact part's (:meth:`GramAccumulator.state`, or
        ``sum`` and ``count``) and ``probes.<g>`` per group; all but ``count`` are this
        accumulator's own, updated in place."""
        exact = self.exact.state() if self._gram else {
            "sum": self.exact, "count": torch.tensor([self._count])}
        return {**exact, **{f"probes.{g}": t for g, t in enumerate(self.groups)}}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Take the entries of :meth:`state` that ``state`` holds (copied in place)."""
        if self._gram:
            self.exact.load_state(state)
        else:
            if "sum" in state:
                self.exact.copy_(state["sum"].to(self.exact))
            if "count" in state:
                self._count = int(state["count"])
        for g, t in enumerate(self.groups):
            if f"probes.{g}" in state:
                t.copy_(state[f"probes.{g}"].to(t))

    def __repr__(self) -> str:
        kind = self.exact.name if self._gram else f"{tuple(self.exact.shape)} sums"
        return (f"EstimateAccumulator({kind}, groups={len(self.groups)}, count={self.count})")
