"""Sections: the computation from one site to the next, and its Jacobian Gram.

For consecutive sites ``l → l+1`` the section is ``f(x)``: the site-``l`` vector (all its
positions, constant coordinate last) mapped to the site-``l+1`` vector, run on the user's
model with hooks (:mod:`tl_degen.adapters`). This module computes, over a data batch,

    M′ += Σ_b Σ_(t,i) Σ_s J[b,t,i,s,:] J[b,t,i,s,:]ᵀ,   J = ∂f̂[t,i]/∂x[s,:]      (§4 step 4)

with ``f̂ = f(x) C_(l+1)`` the next site's coordinates, and for integrated gradients ``J``
averaged over ``α·x`` with quadrature weights.

The model is run forward once per batch and quadrature point; the output directions are then
pulled back with vector-Jacobian products in chunks (``torch.autograd.grad`` with batched
grad outputs), so nothing upstream of the input site is recomputed.

Edges (§4 step 8) need ``A[b,t,i,j] = Σ_s ∂F[t,i]/∂h[s,j] · h[s,j]`` for every pair ``(i, j)``.
Where no closed form applies there are three autograd routes, chosen per section by
:func:`edge_route` from their cost in passes over the section:

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import jvp, vmap

from tl_degen.adapters.base import Adapter
from tl_degen.errors import TLDegenError
from tl_degen.memory import floats_per_layer, memory_budget
from tl_degen.sites import Site

__all__ = ["INTEGRATION_RULES", "integration_rule", "Pullback", "autograd_pullbacks",
           "section_forward",
           "EDGE_ROUTES", "edge_route", "gram_route", "forward_edge_squares",
           "backward_edge_squares"]

EDGE_ROUTES = ("forward", "backward", "probes")

INTEGRATION_RULES = ("gradient", "trapezoid", "gauss-legendre")


def integration_rule(name: str, n_alpha: int | None = None) -> tuple[list[float], list[float]]:
    """Quadrature points ``α`` in [0, 1] and weights (summing to 1) for integrated gradients.

    ``gradient``: ``α = 1`` only (the default; ``n_alpha`` is ignored). ``trapezoid``:
    ``n_alpha`` equally spaced points including both ends. ``gauss-legendre``: ``n_alpha``
    Gauss–Legendre nodes mapped to [0, 1].
    """
    if name == "gradient":
        return [1.0], [1.0]
    if name not in INTEGRATION_RULES:
        raise TLDegenError(f"unknown integration rule {name!r}; use one of "
                           f"{', '.join(INTEGRATION_RULES)}")
    if n_alpha is None:
        n_alpha = 5
    if name == "trapezoid":
        if n_alpha < 2:
            raise TLDegenError("the trapezoid rule needs n_alpha >= 2")
        alphas = np.linspace(0.0, 1.0, n_alpha)
        weights = np.full(n_alpha, 1.0 / (n_alpha - 1))
        weights[[0, -1]] /= 2
    else:
        if n_alpha < 1:
            raise TLDegenError("the Gauss-Legendre rule needs n_alpha >= 1")
        nodes, w = np.polynomial.legendre.leggauss(n_alpha)
        alphas, weights = (nodes + 1) / 2, w / 2
    return alphas.tolist(), weights.tolist()


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


def autograd_pullbacks(
    adapter: Adapter,
    tokens: Int[Tensor, "batch pos"],
    in_site: Site,
    out_site: Site,
    x: Float[Tensor, "batch n_in d_in"],
    out_basis: Float[Tensor, "d_out k"] | None,
    *,
    alphas: list[float],
    weights: list[float],
    chunk: int = 1,
    forward: Callable[[Tensor], Tensor] | None = None,
):
    """Pullbacks of every output direction through the model with autograd.

    The model runs forward once per quadrature point with ``α·x`` written at ``in_site``;
    the (output position, direction) pairs are then pulled back ``chunk`` at a time
    (``is_grads_batched`` above 1), each call batched over all samples. ``forward``, when
    given, replaces the model: the section's own formula (e.g.
    :meth:`tl_degen.sections.closed_form.ClosedFormSection.forward`), input site vectors to output
    site vectors (``tokens`` is then unused). Yields :class:`Pullback`.
    """
    n, n_in, _ = x.shape
    run = forward or section_forward(adapter, tokens, in_site, out_site)
    graphs = []
    for alpha in alphas:
        leaf = (alpha * x).detach().requires_grad_(True)
        graphs.append((leaf, run(leaf)))
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
        if basis is None:  # raw outputs: one-hot rows, never a [d_out, d_out] identity
            grad_out[probe, :, ts, dirs] = 1.0
        else:
            grad_out[probe, :, ts, :] = basis[:, dirs].T[:, None, :]
        total = None
        for (leaf, y), w in zip(graphs, weights):
            if m == 1:
                (g,) = torch.autograd.grad(y, leaf, grad_out[0], retain_graph=True)
                g = g[None]
            else:
                (g,) = torch.autograd.grad(y, leaf, grad_out, retain_graph=True,
                                           is_grads_batched=True)
            total = w * g if total is None else total + w * g
        for t in range(int(ts[0]), int(ts[-1]) + 1):
            sel = ts == t
            yield Pullback(slice(0, n), rows, t, dirs[sel], total[sel].permute(1, 2, 3, 0))


def section_forward(adapter: Adapter, tokens: Int[Tensor, "batch pos"], in_site: Site,
                    out_site: Site) -> Callable[[Tensor], Tensor]:
    """The section as a function of the input site's vectors: the model run on ``tokens``
    with them written at ``in_site``, reading ``out_site``."""

    def run(z: Tensor) -> Tensor:
        return adapter.run(tokens, read=out_site, write=(in_site, z))

    return run


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


def _section_bytes(adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                   itemsize: int) -> int:
    """Rough bytes one sequence's tangent takes through the section (every layer it spans
    kept several times over, plus the output vector)."""
    first = in_site.layer or 0
    last = adapter.n_layers - 1 if out_site.layer is None else out_site.layer
    return itemsize * n_pos * (max(1, last - first + 1) * floats_per_layer(adapter, n_pos)
                               + adapter.site_dim(out_site) + 1)


def forward_edge_squares(
    adapter: Adapter,
    tokens: Int[Tensor, "batch pos"],
    in_site: Site,
    out_site: Site,
    x_eval: Float[Tensor, "batch n_in d_in"],
    h: Float[Tensor, "batch n_in k_in"],
    C_pinv: Float[Tensor, "k_in d_in"],
    out_basis: Float[Tensor, "d_out k_out"] | None,
    *,
    alphas: list[float],
    weights: list[float],
    chunk: int | None = None,
    budget: int | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "k_out k_in"]:
    """This batch's exact ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) by forward-mode autograd.

    For input direction ``j`` the tangent ``V_j[b,s,:] = h[b,s,j]·C⁺[j,:]`` (every input
    position at once) gives ``J·V_j = A[:, :, :, j]`` (in output coordinates after ``out_basis``)
    for every output position and direction. ``chunk`` directions share one pass
    (``torch.func.vmap`` over ``torch.func.jvp``); by default as many as fit ``budget`` bytes
    (:func:`tl_degen.memory.memory_budget`). Integrated rules add ``w_α·J(α·x)·V_j``.
    ``forward`` replaces the model by the section's own formula (as in
    :func:`autograd_pullbacks`).

    Returns:
        ``[k_out, k_in]`` float64 (``k_out = d_out`` for raw outputs such as the logits).
    """
    n, n_in, _ = x_eval.shape
    k_in = h.shape[-1]
    dt = x_eval.dtype
    n_pos = n_in if tokens is None else tokens.shape[1]
    if chunk is None:
        budget = memory_budget(x_eval.device) if budget is None else budget
        per = n * _section_bytes(adapter, in_site, out_site, n_pos, torch.finfo(dt).bits // 8)
        chunk = budget // max(per, 1)
        if x_eval.device.type == "cpu":
            # on CPU, passes of about 6k tangent tokens run fastest (measured on 2 cores,
            # GPT-2-small attention: 32 directions per pass at 16 × 12 tokens took 4.6 s for
            # 562 directions, 180 per pass 8.9 s; 4 to 16 per pass at 16 × 128 tokens)
            chunk = min(chunk, min(32, max(4, 6144 // max(1, n * n_pos))))
        chunk = int(max(1, min(k_in, chunk)))
    basis = None if out_basis is None else out_basis.to(dt)
    Cp = C_pinv.to(dt)
    hd = h.to(dt)
    section = forward or section_forward(adapter, tokens, in_site, out_site)
    E = None
    for start in range(0, k_in, chunk):
        stop = min(k_in, start + chunk)
        V = hd[..., start:stop].permute(2, 0, 1)[..., None] * Cp[start:stop, None, None, :]
        A = None
        for alpha, w in zip(alphas, weights):
            primal = (alpha * x_eval).detach()

            def push(v):
                return jvp(section, (primal,), (v,))[1]

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
    adapter: Adapter,
    tokens: Int[Tensor, "batch pos"],
    in_site: Site,
    out_site: Site,
    x_eval: Float[Tensor, "batch n_in d_in"],
    h: Float[Tensor, "batch n_in k_in"],
    C_pinv: Float[Tensor, "k_in d_in"],
    out_basis: Float[Tensor, "d_out k_out"] | None,
    *,
    alphas: list[float],
    weights: list[float],
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "k_out k_in"]:
    """This batch's exact ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8): one vector-Jacobian product
    per output position and direction (:func:`autograd_pullbacks`; ``forward`` as there).

    Returns:
        ``[k_out, k_in]`` float64.
    """
    E = None
    for pb in autograd_pullbacks(adapter, tokens, in_site, out_site, x_eval, out_basis,
                                 alphas=alphas, weights=weights, forward=forward):
        if E is None:
            k_out = adapter.site_dim(out_site) if out_basis is None else out_basis.shape[1]
            E = torch.zeros(k_out, h.shape[-1], dtype=torch.float64, device=x_eval.device)
        g_h = torch.einsum("brdm,jd->brjm", pb.g.double(), C_pinv.double())
        A = torch.einsum("brjm,brj->bmj", g_h, h[pb.samples][:, pb.in_rows].double())
        E.index_add_(0, pb.dirs, (A * A).sum(0))
    return E
