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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.errors import TLDegenError
from tl_degen.sites import Site

__all__ = ["INTEGRATION_RULES", "integration_rule", "Pullback", "autograd_pullbacks"]

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
):
    """Pullbacks of every output direction through the model with autograd.

    The model runs forward once per quadrature point with ``α·x`` written at ``in_site``;
    output directions are then pulled back ``chunk`` at a time (``is_grads_batched`` above
    1), each call batched over all samples. Yields :class:`Pullback`.
    """
    n, n_in, _ = x.shape
    graphs = []
    for alpha in alphas:
        leaf = (alpha * x).detach().requires_grad_(True)
        y = adapter.run(tokens, read=out_site, write=(in_site, leaf))
        graphs.append((leaf, y))
    _, n_out, d_out = graphs[0][1].shape
    basis = None if out_basis is None else out_basis.to(x.dtype)
    k = d_out if basis is None else basis.shape[1]
    rows = list(range(n_in))
    for t in range(n_out):
        for start in range(0, k, chunk):
            dirs = torch.arange(start, min(k, start + chunk), device=x.device)
            m = len(dirs)
            grad_out = torch.zeros(m, n, n_out, d_out, dtype=x.dtype, device=x.device)
            if basis is None:  # raw outputs: one-hot rows, never a [d_out, d_out] identity
                grad_out[torch.arange(m, device=x.device), :, t, dirs] = 1.0
            else:
                grad_out[:, :, t, :] = basis[:, dirs].T[:, None, :]
            total = None
            for (leaf, y), w in zip(graphs, weights):
                if m == 1:
                    (g,) = torch.autograd.grad(y, leaf, grad_out[0], retain_graph=True)
                    g = g[None]
                else:
                    (g,) = torch.autograd.grad(y, leaf, grad_out, retain_graph=True,
                                               is_grads_batched=True)
                total = w * g if total is None else total + w * g
            yield Pullback(slice(0, n), rows, t, dirs, total.permute(1, 2, 3, 0))
