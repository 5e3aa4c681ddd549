"""Autograd routes: a section's pullbacks, Jacobian Gram and edges differentiated by torch.

Every route takes the section as a function ``run`` of the input site's vectors (the model run
with them written at the input site, or a recognised section's own formula) and computes, over
a batch,

    M′ += Σ_b Σ_(t,i) Σ_s J[b,t,i,s,:] J[b,t,i,s,:]ᵀ,   J = ∂f̂[t,i]/∂x[s,:]      (§4 step 4)

with ``f̂ = f(x) C_(l+1)`` the next site's coordinates, and for integrated gradients ``J``
averaged over ``α·x`` with quadrature weights (:mod:`tl_degen.sections.rules`). The section is
run forward once per batch and quadrature point; output directions are then pulled back in
chunks (``torch.autograd.grad`` with batched grad outputs), so nothing upstream of the input
site is recomputed.

Edges (§4 step 8) need ``A[b,t,i,j] = Σ_s ∂F[t,i]/∂h[s,j] · h[s,j]`` for every pair ``(i, j)``.
Three routes compute them; :func:`edge_route` picks by their cost in passes over the section:

* ``"forward"``: one Jacobian-vector product per *input* direction ``j`` — the tangent
  ``h[s,j]·C⁺[j,:]`` at every input position — gives ``A[:, :, :, j]`` for every output
  position and direction at once (``torch.func.jvp`` under ``vmap``, many directions per
  pass): ``k_in`` products, exact;
* ``"backward"``: one vector-Jacobian product per output position and direction:
  ``P_out·k_out`` products, exact;
* ``"probes"``: random signs over the output positions (:mod:`tl_degen.sections.probes`):
  ``n_probes·k_out`` products, an estimate with its standard error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jvp, vmap

from tl_degen.memory import memory_budget
from tl_degen.stats import CHUNK_ROWS, GramAccumulator

__all__ = ["EDGE_ROUTES", "Pullback", "graphs_at", "pull_back", "autograd_pullbacks",
           "backward_gram", "edge_route", "gram_route", "forward_chunk", "forward_edge_squares",
           "backward_edge_squares"]

EDGE_ROUTES = ("forward", "backward", "probes")

#: The section as a function of the input site's vectors ``[batch, n_in, d_in]``, returning
#: the output site's ``[batch, n_out, d_out]``.
Run = Callable[[Tensor], Tensor]


@dataclass
class Pullback:
    """Vector-Jacobian products of one block of output directions (DESIGN.md §4 step 4).

    ``g[b, r, :, m]`` is the gradient, with respect to the input vector at input position
    ``in_rows[r]`` of sample ``samples[b]``, of output coordinate ``dirs[m]`` of the output
    basis at output position ``t`` (an index into the output site's positions), averaged over
    the integration points. Input positions not listed have zero gradient.
    """

    samples: slice
    in_rows: list[int]
    t: int
    dirs: Tensor
    g: Tensor  # [b, len(in_rows), d_in, m]


def graphs_at(run: Run, x: Tensor, alphas: list[float]) -> list[tuple[Tensor, Tensor]]:
    """``(leaf, run(leaf))`` with ``leaf = α·x`` requiring grad, one per quadrature point."""
    graphs = []
    for alpha in alphas:
        leaf = (alpha * x).detach().requires_grad_(True)
        graphs.append((leaf, run(leaf)))
    return graphs


def pull_back(graphs: list[tuple[Tensor, Tensor]], weights: list[float], grad_out: Tensor,
              batched: bool = False) -> Tensor:
    """``Σ_α w_α J(α x)ᵀ grad_out``; with ``batched`` the leading dimension of ``grad_out``
    holds several output vectors, pulled back in one pass (``is_grads_batched``)."""
    total = None
    for (leaf, y), w in zip(graphs, weights):
        if batched and grad_out.shape[0] == 1:
            (g,) = torch.autograd.grad(y, leaf, grad_out[0], retain_graph=True)
            g = g[None]
        else:
            (g,) = torch.autograd.grad(y, leaf, grad_out, retain_graph=True,
                                       is_grads_batched=batched)
        if total is None:
            total = g if w == 1.0 else w * g  # one point of weight 1: no copy
        else:
            total = total + w * g
    return total


def autograd_pullbacks(
    run: Run,
    x: Float[Tensor, "batch n_in d_in"],
    out_basis: Float[Tensor, "d_out k"] | None,
    *,
    alphas: list[float],
    weights: list[float],
    chunk: int = 1,
) -> Iterator[Pullback]:
    """Pullbacks of every output direction through ``run`` with autograd.

    ``run`` is evaluated once per quadrature point at ``α·x``; the (output position,
    direction) pairs are then pulled back ``chunk`` at a time (``is_grads_batched`` above 1),
    each call batched over all samples. ``out_basis`` ``None``: the raw output coordinates
    (one-hot rows, never a ``[d_out, d_out]`` identity). Yields :class:`Pullback`.
    """
    n, n_in, _ = x.shape
    graphs = graphs_at(run, x, alphas)
    _, n_out, d_out = graphs[0][1].shape
    basis = None if out_basis is None else out_basis.to(x.dtype)
    k = d_out if basis is None else basis.shape[1]
    rows = list(range(n_in))
    # (output position, direction) pairs in order, ``chunk`` per pass: one pass may span
    # several positions; it yields one Pullback per position
    for start in range(0, n_out * k, chunk):
        flat = torch.arange(start, min(n_out * k, start + chunk), device=x.device)
        ts, dirs = flat // k, flat % k
        m = len(flat)
        grad_out = torch.zeros(m, n, n_out, d_out, dtype=x.dtype, device=x.device)
        probe = torch.arange(m, device=x.device)
        if basis is None:
            grad_out[probe, :, ts, dirs] = 1.0
        else:
            grad_out[probe, :, ts, :] = basis[:, dirs].T[:, None, :]
        total = pull_back(graphs, weights, grad_out, batched=True)
        for t in range(int(ts[0]), int(ts[-1]) + 1):
            sel = ts == t
            yield Pullback(slice(0, n), rows, t, dirs[sel], total[sel].permute(1, 2, 3, 0))


def backward_gram(run: Run, x: Float[Tensor, "batch n_in d_in"],
                  out_basis: Float[Tensor, "d_out k"] | None, acc: GramAccumulator, *,
                  alphas: list[float], weights: list[float]) -> None:
    """Add the batch's exact ``Σ J K Jᵀ`` (§4 step 4) and ``N·P_in`` to ``acc``: one
    vector-Jacobian product per output position and direction.

    The pullbacks' rows are gathered into one QR update of the accumulator's factor per
    ``2·d`` rows or more: an update per pullback repeats the factorisation's fixed cost."""
    rows, n_rows, limit = [], 0, max(CHUNK_ROWS, 2 * acc.d)
    for pb in autograd_pullbacks(run, x, out_basis, alphas=alphas, weights=weights):
        rows.append(pb.g.transpose(-1, -2).reshape(-1, acc.d))
        n_rows += rows[-1].shape[0]
        if n_rows >= limit:
            acc.add_rows(torch.cat(rows))
            rows, n_rows = [], 0
    if rows:
        acc.add_rows(torch.cat(rows))
    acc.add_count(x.shape[0] * x.shape[1])


def edge_route(k_in: int, k_out: int, n_out_pos: int, n_probes: int | None) -> str:
    """The cheapest autograd route for a section's edges (see the module docstring).

    Costs in passes over the section: ``"forward"`` ``k_in`` (a Jacobian-vector product costs
    about what a vector-Jacobian product does), ``"backward"`` ``n_out_pos·k_out``,
    ``"probes"`` ``n_probes·k_out``. An exact route wins unless probing costs less than half
    of it (an estimate is worth taking only when it saves real time).

    Examples:
        >>> edge_route(k_in=562, k_out=562, n_out_pos=12, n_probes=32)  # attention, all pos
        'forward'
        >>> edge_route(k_in=769, k_out=49, n_out_pos=1, n_probes=32)    # to a :last site
        'backward'
    """
    exact = min(("forward", k_in), ("backward", n_out_pos * k_out), key=lambda r: r[1])
    if n_probes is not None and 2 * n_probes * k_out < exact[1]:
        return "probes"
    return exact[0]


def gram_route(k_out: int, n_out_pos: int, n_probes: int | None) -> str:
    """``"backward"`` (exact: one vector-Jacobian product per output position and direction,
    ``n_out_pos·k_out`` of them) or ``"probes"`` (``n_probes`` products, probing positions and
    directions jointly) for a section's Jacobian Gram (§4 steps 4 and 9): probes only when
    asked for and less than half the exact cost.

    Examples:
        >>> gram_route(k_out=48, n_out_pos=1, n_probes=32)       # into a :last site: exact
        'backward'
        >>> gram_route(k_out=562, n_out_pos=12, n_probes=32)
        'probes'
    """
    if n_probes is not None and 2 * n_probes < n_out_pos * k_out:
        return "probes"
    return "backward"


def forward_chunk(n: int, n_pos: int, sequence_bytes: int, k_in: int, device: torch.device,
                  budget: int | None = None) -> int:
    """Input directions per forward-mode pass: as many as fit ``budget`` bytes
    (:func:`tl_degen.memory.memory_budget`), ``sequence_bytes`` being one sequence's tangent
    through the section. On a CPU passes are also kept to about 6k tangent tokens (4 to 32
    directions): larger passes fall out of the caches and run slower per direction."""
    budget = memory_budget(device) if budget is None else budget
    chunk = budget // max(n * sequence_bytes, 1)
    if device.type == "cpu":
        chunk = min(chunk, min(32, max(4, 6144 // max(1, n * n_pos))))
    return int(max(1, min(k_in, chunk)))


def forward_edge_squares(
    run: Run,
    x_eval: Float[Tensor, "batch n_in d_in"],
    h: Float[Tensor, "batch n_in k_in"],
    C_pinv: Float[Tensor, "k_in d_in"],
    out_basis: Float[Tensor, "d_out k_out"] | None,
    *,
    alphas: list[float],
    weights: list[float],
    chunk: int,
) -> Float[Tensor, "k_out k_in"]:
    """This batch's exact ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) by forward-mode autograd.

    For input direction ``j`` the tangent ``V_j[b,s,:] = h[b,s,j]·C⁺[j,:]`` (every input
    position at once) gives ``J·V_j = A[:, :, :, j]`` (in output coordinates after ``out_basis``)
    for every output position and direction. ``chunk`` directions share one pass
    (``torch.func.vmap`` over ``torch.func.jvp``; :func:`forward_chunk`). Integrated rules add
    ``w_α·J(α·x)·V_j``.

    Returns:
        ``[k_out, k_in]`` float64 (``k_out = d_out`` for raw outputs such as the logits).
    """
    k_in = h.shape[-1]
    dt = x_eval.dtype
    basis = None if out_basis is None else out_basis.to(dt)
    Cp = C_pinv.to(dt)
    hd = h.to(dt)
    E = None
    for start in range(0, k_in, chunk):
        stop = min(k_in, start + chunk)
        V = hd[..., start:stop].permute(2, 0, 1)[..., None] * Cp[start:stop, None, None, :]
        A = None
        for alpha, w in zip(alphas, weights):
            primal = (alpha * x_eval).detach()

            def push(v):
                return jvp(run, (primal,), (v,))[1]

            Y = vmap(push)(V)  # [m, b, P_out, d_out]
            if basis is not None:
                Y = Y @ basis
            A = w * Y if A is None else A + w * Y
        block = A.double().square_().sum(dim=(1, 2)).T  # [k_out, chunk], float64
        if E is None:
            E = torch.zeros(block.shape[0], k_in, dtype=torch.float64, device=x_eval.device)
        E[:, start:stop] = block
    return E


def backward_edge_squares(
    pullbacks: Iterator[Pullback],
    h: Float[Tensor, "batch n_in k_in"],
    C_pinv: Float[Tensor, "k_in d_in"],
    k_out: int,
) -> Float[Tensor, "k_out k_in"]:
    """This batch's exact ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) from the pullbacks of every
    output direction (evaluated at the projected input): ``A[b,t,i,j] = Σ_s g[b,s,:,i]·C⁺[j,:]
    h[b,s,j]``.

    Returns:
        ``[k_out, k_in]`` float64.
    """
    E = torch.zeros(k_out, h.shape[-1], dtype=torch.float64, device=h.device)
    Cp = C_pinv.double()
    for pb in pullbacks:
        g_h = torch.einsum("brdm,jd->brjm", pb.g.double(), Cp)
        A = torch.einsum("brjm,brj->bmj", g_h, h[pb.samples][:, pb.in_rows].double())
        E.index_add_(0, pb.dirs, (A * A).sum(0))
    return E
