"""One section between two sites, planned once: how its Jacobian Gram and its edges are
computed on each batch.

A section ``f`` maps the vectors at one site to the next (DESIGN.md §4). Both verbs need the
same two things from it, batch by batch:

* its Jacobian Gram ``Σ J K Jᵀ`` (§4 step 4) for :func:`tl_degen.fit_bases`;
* its edge squares ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) for :func:`tl_degen.interaction_graph`.

:class:`SectionPlan` is that interface. It picks, once per section (and once per prompt
length), among three implementations:

* **closed form** (:mod:`tl_degen.sections.closed_form`): MLP, attention, linear and unembedding
  sections without normalisation, checked against the model's own forward pass and one
  vector-Jacobian product on the first batch of each length. Attention after a LayerNorm or
  RMSNorm has its formula only: the autograd routes below then differentiate that formula
  (one layer's attention in a few matmuls) instead of the model (route names end in
  "(section formula)");
* **batched autograd** (:mod:`tl_degen.sections.autograd`): exact, by the cheapest of forward-mode
  (one Jacobian-vector product per input direction) and backward-mode (one vector-Jacobian
  product per output position and direction), :func:`~tl_degen.sections.edge_route` and
  :func:`~tl_degen.sections.gram_route`;
* **stochastic** (:mod:`tl_degen.sections.probes`): random-sign probes with their standard error,
  when ``n_probes`` is given and probing costs less than half the exact route.

Examples:
    >>> plan = SectionPlan(adapter, Site.parse("resid_pre.0"), Site.parse("resid_mid.0:last"),
    ...                    alphas=[1.0], weights=[1.0])
    >>> plan.edge_squares(tokens, x, x_proj, h, C_pinv, out_C)   # [k_out, k_in] float64
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.autograd import (
    autograd_pullbacks,
    backward_edge_squares,
    edge_route,
    forward_edge_squares,
    gram_route,
)
from tl_degen.sections.closed_form import ClosedFormSection, recognise
from tl_degen.sections.probes import (
    StochasticEstimate,
    estimate_edge_squares,
    estimate_jacobian_gram,
)
from tl_degen.sites import Site
from tl_degen.stats import CHUNK_ROWS, GramAccumulator

__all__ = ["SectionPlan", "accumulate_jacobian_gram"]


class SectionPlan:
    """How the section ``in_site → out_site`` is differentiated, chosen once.

    Args:
        adapter: the model's adapter (the model already in the dtype of the passes).
        in_site, out_site: consecutive sites; ``out_site`` may be ``logits``.
        alphas, weights: the integration rule (:func:`tl_degen.sections.integration_rule`).
        closed_form: use a closed form where the section has one.
        n_probes, n_groups, generator: random probes where they are cheaper
            (``None``: exact everywhere).
        route: force the edges' autograd route (``"forward"``, ``"backward"``, ``"probes"``);
            ``None`` takes the cheapest.

    Attributes:
        routes: the implementations used so far (``"closed form"``, ``"forward"``, ...).
    """

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, *,
                 alphas: list[float], weights: list[float], closed_form: bool = True,
                 n_probes: int | None = None, n_groups: int = 4,
                 generator: torch.Generator | None = None, route: str | None = None):
        self.adapter, self.in_site, self.out_site = adapter, in_site, out_site
        self.alphas, self.weights = alphas, weights
        self.closed_form, self.route = closed_form, route
        self.n_probes, self.n_groups, self.generator = n_probes, n_groups, generator
        self.routes: set[str] = set()
        self._closed: dict[int, ClosedFormSection | None] = {}

    def __repr__(self) -> str:
        used = ", ".join(sorted(self.routes)) or "nothing yet"
        return f"SectionPlan({self.in_site.name} → {self.out_site.name}; used: {used})"

    def closed(self, tokens: Int[Tensor, "batch pos"], x: Tensor,
               y: Tensor | None = None) -> ClosedFormSection | None:
        """The section's closed form for prompts of this length, recognised (and checked
        against the model) on the first batch of that length; ``y``: the output site's
        vectors on ``tokens``, when already read."""
        if not self.closed_form:
            return None
        n_pos = tokens.shape[1]
        if n_pos not in self._closed:
            self._closed[n_pos] = recognise(self.adapter, tokens, self.in_site,
                                            self.out_site, x, y)
        return self._closed[n_pos]

    def _exact_closed(self, tokens, x, y) -> ClosedFormSection | None:
        section = self.closed(tokens, x, y)
        return None if section is None or section.formula_only else section

    def _formula(self, tokens, x, y):
        """The section's formula to differentiate instead of the model, if there is one."""
        section = self.closed(tokens, x, y)
        return section.forward if section is not None and section.formula_only else None

    def _route_name(self, route: str, formula) -> str:
        return route if formula is None else f"{route} (section formula)"

    def _k_out(self, out_basis: Tensor | None) -> int:
        return self.adapter.site_dim(self.out_site) if out_basis is None else out_basis.shape[1]

    def _n_out_pos(self, tokens: Tensor) -> int:
        return len(self.out_site.resolve_positions(tokens.shape[1]))

    # ------------------------------------------------------------------ Jacobian Gram
    def gram_is_probed(self, tokens: Int[Tensor, "batch pos"], x: Tensor,
                       out_basis: Tensor | None, y: Tensor | None = None) -> bool:
        """Whether this batch's Jacobian Gram is estimated with probes (else exact)."""
        return self._exact_closed(tokens, x, y) is None and gram_route(
            self._k_out(out_basis), self._n_out_pos(tokens), self.n_probes) == "probes"

    def add_jacobian_gram(
        self, tokens: Int[Tensor, "batch pos"], x: Float[Tensor, "batch n_in d_in"],
        out_basis: Float[Tensor, "d_out k"] | None, acc: GramAccumulator,
        y: Tensor | None = None,
    ) -> StochasticEstimate | None:
        """Add this batch's exact ``Σ J K Jᵀ`` (§4 step 4) and ``N·P_in`` to ``acc``; or, where
        the plan probes, leave ``acc`` alone and return the estimate (its groups are sums over
        the batch, to be added to ``acc`` once complete)."""
        section = self._exact_closed(tokens, x, y)
        if section is not None:
            self.routes.add("closed form")
            section.add_jacobian_gram(x, out_basis, acc, self.alphas, self.weights)
            return None
        formula = self._formula(tokens, x, y)
        if self.gram_is_probed(tokens, x, out_basis, y):
            self.routes.add(self._route_name("probes", formula))
            return estimate_jacobian_gram(
                self.adapter, tokens, self.in_site, self.out_site, x, out_basis,
                alphas=self.alphas, weights=self.weights, n_probes=self.n_probes,
                n_groups=self.n_groups, generator=self.generator, forward=formula)
        self.routes.add(self._route_name("backward", formula))
        # rows gathered over pullbacks into one QR update of the factor per 2·d rows or more
        # (one per pullback cost 3x more on a GPT-2-small-shaped MLP into a :last site)
        rows, n_rows, limit = [], 0, max(CHUNK_ROWS, 2 * acc.d)
        for pb in autograd_pullbacks(self.adapter, tokens, self.in_site, self.out_site, x,
                                     out_basis, alphas=self.alphas, weights=self.weights,
                                     forward=formula):
            rows.append(pb.g.transpose(-1, -2).reshape(-1, acc.d))
            n_rows += rows[-1].shape[0]
            if n_rows >= limit:
                acc.add_rows(torch.cat(rows))
                rows, n_rows = [], 0
        if rows:
            acc.add_rows(torch.cat(rows))
        acc.add_count(x.shape[0] * x.shape[1])
        return None

    # ------------------------------------------------------------------ edges
    def edge_squares(
        self, tokens: Int[Tensor, "batch pos"], x: Float[Tensor, "batch n_in d_in"],
        x_proj: Float[Tensor, "batch n_in d_in"], h: Float[Tensor, "batch n_in k_in"],
        C_pinv: Float[Tensor, "k_in d_in"], out_basis: Float[Tensor, "d_out k_out"] | None,
        y: Tensor | None = None,
    ) -> Float[Tensor, "k_out k_in"] | StochasticEstimate:
        """This batch's ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8), ``[k_out, k_in]`` float64, exact;
        or, where the plan probes, its estimate.

        ``x``: the input site's vectors (the closed form is recognised on them); ``x_proj``
        and ``h``: the same projected onto the kept directions and in basis coordinates."""
        section = self._exact_closed(tokens, x, y)
        if section is not None:
            self.routes.add("closed form")
            return section.edge_squares(x_proj, h, C_pinv, out_basis, self.alphas,
                                        self.weights)
        formula = self._formula(tokens, x, y)
        chosen = self.route or edge_route(h.shape[-1], self._k_out(out_basis),
                                          self._n_out_pos(tokens), self.n_probes)
        self.routes.add(self._route_name(chosen, formula))
        args = (self.adapter, tokens, self.in_site, self.out_site, x_proj, h, C_pinv, out_basis)
        if chosen == "probes":
            return estimate_edge_squares(*args, alphas=self.alphas, weights=self.weights,
                                         n_probes=self.n_probes, n_groups=self.n_groups,
                                         generator=self.generator, forward=formula)
        routine = forward_edge_squares if chosen == "forward" else backward_edge_squares
        return routine(*args, alphas=self.alphas, weights=self.weights, forward=formula)


def accumulate_jacobian_gram(
    adapter: Adapter,
    tokens: Int[Tensor, "batch pos"],
    in_site: Site,
    out_site: Site,
    x: Float[Tensor, "batch n_in d_in"],
    out_basis: Float[Tensor, "d_out k"] | None,
    acc: GramAccumulator,
    *,
    alphas: list[float],
    weights: list[float],
    closed_form: bool = True,
) -> None:
    """Add one batch's exact ``Σ J K Jᵀ`` (§4 step 4) to ``acc`` and ``N·P_in`` to its count:
    a :class:`SectionPlan` without probes, for one batch.

    Args:
        x: the input site's vectors on this batch (constant coordinate last), in the dtype
            the model runs in.
        out_basis: ``C`` of the output site (``[d_out (+1), k]``); ``None`` for raw outputs
            (unrotated logits).
        closed_form: use :mod:`tl_degen.sections.closed_form` where the section allows it.
    """
    SectionPlan(adapter, in_site, out_site, alphas=alphas, weights=weights,
                closed_form=closed_form).add_jacobian_gram(tokens, x, out_basis, acc)
