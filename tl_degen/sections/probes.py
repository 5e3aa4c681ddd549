"""Stochastic (Hutchinson) estimates of the Jacobian Gram and of the edges (DESIGN.md §4 step 9).

The exact sums run over every output position ``t`` and output direction ``i``: one
vector-Jacobian product each. With random signs ``r ∈ {±1}`` (independent per sample),
``g_r = Σ_(t,i) r_(t,i) g_(t,i)`` costs one product and ``E[g_r g_rᵀ] = Σ_(t,i) g_(t,i) g_(t,i)ᵀ``
because the cross terms average out. For edges, only the output positions are probed
(``A_r[b,i,j] = Σ_t r_t A[b,t,i,j]``, ``E[A_r²] = Σ_t A²``).

Every estimate comes with its error: the probes are split into ``n_groups`` groups, each gives
an independent estimate, and the reported error is the standard error of their mean,
``‖std over groups‖_F / √n_groups``, relative to ``‖estimate‖_F``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_degen.errors import TLDegenError
from tl_degen.sections.autograd import Run, graphs_at, pull_back
from tl_degen.sections.base import Section
from tl_degen.stats import GramAccumulator, StochasticEstimate

__all__ = ["StochasticEstimate", "ProbedSection", "estimate_jacobian_gram",
           "estimate_edge_squares"]


def _check(n_probes: int, n_groups: int) -> int:
    if n_groups < 2 or n_probes < n_groups:
        raise TLDegenError(f"need at least 2 probe groups and n_probes >= n_groups; got "
                           f"n_probes={n_probes}, n_groups={n_groups}")
    return n_probes // n_groups


#: Tokens (batch × positions, over all probes of a pass) up to which probes are pulled back
#: together, in one batched vector-Jacobian product (``is_grads_batched``): batching saves
#: the per-pass overhead on short batches, but a batched pass over long prompts no longer
#: fits the caches and runs slower than one probe at a time.
BATCHED_PROBE_TOKENS = 1536


def probes_per_pass(n_tokens: int) -> int:
    """Probes per batched pullback for a batch of ``n_tokens`` tokens: up to 8, as many as
    keep the pass within :data:`BATCHED_PROBE_TOKENS` tokens."""
    return max(1, min(8, BATCHED_PROBE_TOKENS // max(1, n_tokens)))


def estimate_jacobian_gram(
    run: Run, x: Tensor, out_basis: Tensor | None, *, alphas: list[float],
    weights: list[float], n_probes: int, n_groups: int = 4,
    generator: torch.Generator | None = None, n_tokens: int | None = None,
) -> StochasticEstimate:
    """Hutchinson estimate of this batch's ``Σ J Jᵀ`` (§4 step 4) through ``run`` (the
    section as a function of its input), probing output positions and output directions
    jointly with ``n_probes`` probes in ``n_groups`` groups. ``n_tokens``: the batch's
    tokens, which set the probes per pass (default: the input's positions)."""
    per_group = _check(n_probes, n_groups)
    graphs = graphs_at(run, x, alphas)
    y = graphs[0][1]
    # raw outputs (the logits, d_out up to a vocabulary) are probed directly: never a
    # [d_out, d_out] identity
    C = None if out_basis is None else out_basis.to(x.dtype)
    k = y.shape[-1] if C is None else C.shape[1]
    step = probes_per_pass(n_tokens if n_tokens is not None else x.shape[:2].numel())
    groups = []
    for _ in range(n_groups):
        acc = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        for start in range(0, per_group, step):
            m = min(step, per_group - start)
            r = torch.randint(0, 2, (m, *y.shape[:2], k), generator=generator,
                              device="cpu").to(x.device, x.dtype) * 2 - 1
            g = pull_back(graphs, weights, r if C is None else r @ C.T, batched=True).reshape(
                -1, x.shape[-1]).double()
            acc.addmm_(g.T, g)
        groups.append(acc.div_(per_group))
    return StochasticEstimate(groups)


def estimate_edge_squares(
    run: Run, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None, *,
    alphas: list[float], weights: list[float], n_probes: int, n_groups: int = 4,
    generator: torch.Generator | None = None,
) -> StochasticEstimate:
    """Hutchinson estimate of this batch's ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) through
    ``run``, probing the output positions; every output direction ``i`` is still pulled back
    exactly."""
    per_group = _check(n_probes, n_groups)
    graphs = graphs_at(run, x_eval, alphas)
    y = graphs[0][1]
    C = None if out_basis is None else out_basis.to(x_eval.dtype)
    k = y.shape[-1] if C is None else C.shape[1]
    groups = []
    for _ in range(n_groups):
        acc = torch.zeros(k, C_pinv.shape[0], dtype=torch.float64, device=x_eval.device)
        for _ in range(per_group):
            r = torch.randint(0, 2, y.shape[:2], generator=generator,
                              device="cpu").to(x_eval.device, x_eval.dtype) * 2 - 1
            for i in range(k):
                if C is None:  # raw output i: a one-hot column
                    grad_out = torch.zeros_like(y)
                    grad_out[..., i] = r
                else:
                    grad_out = r[..., None] * C[:, i]
                g = pull_back(graphs, weights, grad_out).double()  # [b, P_in, d]
                A = torch.einsum("bsd,jd,bsj->bj", g, C_pinv, h)
                acc[i] += (A * A).sum(0)
        groups.append(acc / per_group)
    return StochasticEstimate(groups)


class ProbedSection(Section):
    """Another section's Jacobian Gram and edges estimated with random probes, each with
    its standard error (the module docstring): ``n_probes`` probes in ``n_groups`` groups.

    :meth:`add_jacobian_gram` leaves the accumulator alone and returns the estimate (its
    groups are sums over the batch, added to the accumulator once complete);
    :meth:`edge_squares` returns the estimate too."""

    def __init__(self, inner: Section, n_probes: int, n_groups: int = 4,
                 generator: torch.Generator | None = None):
        super().__init__(inner.adapter, inner.in_site, inner.out_site, inner.n_pos)
        self.inner, self.n_probes, self.n_groups, self.generator = (inner, n_probes, n_groups,
                                                                    generator)
        self.route_suffix = inner.route_suffix

    def __repr__(self) -> str:
        return f"ProbedSection({self.inner!r}, n_probes={self.n_probes})"

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor | None:
        return self.inner.forward(x, tokens)

    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> StochasticEstimate:
        return estimate_jacobian_gram(
            self.run(tokens), x, out_basis, alphas=alphas, weights=weights,
            n_probes=self.n_probes, n_groups=self.n_groups, generator=self.generator,
            n_tokens=None if tokens is None else tokens.numel())

    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor,
                     out_basis: Tensor | None, alphas: list[float], weights: list[float],
                     tokens: Tensor | None = None, route: str | None = None
                     ) -> StochasticEstimate:
        return estimate_edge_squares(self.run(tokens), x_eval, h, C_pinv, out_basis,
                                     alphas=alphas, weights=weights, n_probes=self.n_probes,
                                     n_groups=self.n_groups, generator=self.generator)
