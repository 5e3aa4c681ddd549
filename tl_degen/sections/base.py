"""The section interface: the computation from one site to the next (DESIGN.md §4).

For consecutive sites ``l → l+1`` the section is ``f(x)``: the site-``l`` vectors (all its
positions, constant coordinate last) mapped to the site-``l+1`` vectors. Both verbs need the
same four things of it, batch by batch:

* its **forward** pass (:meth:`Section.forward`), for the sites after the first and for
  ablations;
* its **pullbacks** (vector-Jacobian products of every output direction);
* its **Jacobian Gram** ``Σ J K Jᵀ`` (§4 step 4) for :func:`tl_degen.fit_bases`;
* its **edge squares** ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) for
  :func:`tl_degen.interaction_graph`.

One implementation per route:

* :class:`ModelSection` runs the user's model with the input written at the input site and
  differentiates it with autograd (:mod:`tl_degen.sections.autograd`);
* the closed forms (:mod:`tl_degen.sections.mlp`, :mod:`tl_degen.sections.attention`) compute
  the section from its weights; where ``closed_form`` is true, their Gram, edges and pullbacks
  are closed forms as well, and otherwise autograd differentiates their formula instead of the
  model;
* :class:`~tl_degen.sections.probes.ProbedSection` estimates the Gram and edges of another
  section with random probes.

Which one a batch uses is decided by :class:`~tl_degen.sections.plan.SectionPlan`, the only
place sections are recognised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from jaxtyping import Float, Int
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.memory import floats_per_layer
from tl_degen.sections.autograd import (
    Pullback,
    autograd_pullbacks,
    backward_edge_squares,
    backward_gram,
    edge_route,
    forward_chunk,
    forward_edge_squares,
)
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["Section", "ModelSection"]


class Section:
    """The section ``in_site → out_site`` on prompts of ``n_pos`` tokens.

    Subclasses implement :meth:`forward`; the Gram, edges and pullbacks default to autograd
    through it (the cheaper of forward and backward mode for the edges). Every method takes
    the batch's ``tokens``, which only sections that run the model read.

    Attributes:
        closed_form: whether the Jacobian Gram, edges and pullbacks are closed forms (no
            autograd, never probed).
        route_suffix: appended to the autograd routes' names in ``SectionPlan.routes``.
    """

    closed_form: ClassVar[bool] = False
    route_suffix: ClassVar[str] = ""

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int):
        self.adapter, self.in_site, self.out_site, self.n_pos = adapter, in_site, out_site, n_pos

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.in_site.name} → {self.out_site.name}, "
                f"{self.n_pos} positions)")

    # ------------------------------------------------------------------ shapes
    @property
    def d_out(self) -> int:
        """The output site's width, its constant coordinate included (none for logits)."""
        return self.adapter.site_dim(self.out_site) + int(self.out_site.has_constant)

    def k_out(self, out_basis: Tensor | None) -> int:
        """Output directions: the basis' columns, or every raw output coordinate."""
        return self.d_out if out_basis is None else out_basis.shape[1]

    @property
    def n_out_pos(self) -> int:
        return len(self.out_site.resolve_positions(self.n_pos))

    def sequence_bytes(self, n_pos: int, itemsize: int) -> int:
        """Rough bytes one sequence's tangent takes through the section (every layer it
        spans kept several times over, plus the output vector)."""
        first = self.in_site.layer or 0
        last = (self.adapter.n_layers - 1 if self.out_site.layer is None
                else self.out_site.layer)
        return itemsize * n_pos * (max(1, last - first + 1)
                                   * floats_per_layer(self.adapter, n_pos)
                                   + self.adapter.site_dim(self.out_site) + 1)

    # ------------------------------------------------------------------ the interface
    def forward(self, x: Float[Tensor, "batch n_in d_in"],
                tokens: Int[Tensor, "batch pos"] | None = None
                ) -> Float[Tensor, "batch n_out d_out"] | None:
        """The output site's vectors as :meth:`Adapter.run` reads them with ``x`` written at
        the input site: ``[batch, n_out_positions, d_out (+1)]``, constant coordinate last
        (none for logits). ``None`` when the section cannot compute every output position
        from ``x`` alone (the caller then runs the model)."""
        raise NotImplementedError

    def run(self, tokens: Tensor | None):
        """:meth:`forward` as a function of ``x`` alone, for autograd."""
        return lambda z: self.forward(z, tokens)

    def pullbacks(self, x: Float[Tensor, "batch n_in d_in"], out_basis: Tensor | None,
                  alphas: list[float], weights: list[float],
                  tokens: Tensor | None = None) -> Iterator[Pullback]:
        """Pullbacks of every output direction (columns of ``out_basis``, or the raw
        outputs), evaluated at ``x`` and averaged over the integration rule."""
        return autograd_pullbacks(self.run(tokens), x, out_basis, alphas=alphas,
                                  weights=weights)

    def add_jacobian_gram(self, x: Float[Tensor, "batch n_in d_in"], out_basis: Tensor | None,
                          acc: GramAccumulator, alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        """Add the batch's exact ``Σ J K Jᵀ`` (§4 step 4) to ``acc`` and ``N·P_in`` to its
        count (``K = C Cᵀ`` of ``out_basis``)."""
        backward_gram(self.run(tokens), x, out_basis, acc, alphas=alphas, weights=weights)

    def edge_squares(self, x_eval: Float[Tensor, "batch n_in d_in"],
                     h: Float[Tensor, "batch n_in k_in"], C_pinv: Float[Tensor, "k_in d_in"],
                     out_basis: Tensor | None, alphas: list[float], weights: list[float],
                     tokens: Tensor | None = None, route: str | None = None
                     ) -> Float[Tensor, "k_out k_in"]:
        """The batch's exact ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8), ``[k_out, k_in]`` float64,
        evaluated at ``x_eval`` (the input projected onto the kept directions; ``h`` its
        coordinates). ``route``: ``"forward"`` or ``"backward"``; ``None`` takes the cheaper
        (:func:`~tl_degen.sections.autograd.edge_route`)."""
        k_out = self.k_out(out_basis)
        route = route or self.edge_route(h.shape[-1], k_out, None)
        run = self.run(tokens)
        if route == "backward":
            return backward_edge_squares(
                autograd_pullbacks(run, x_eval, out_basis, alphas=alphas, weights=weights),
                h, C_pinv, k_out)
        n, n_in = x_eval.shape[:2]
        n_pos = n_in if tokens is None else tokens.shape[1]
        itemsize = x_eval.element_size()
        chunk = forward_chunk(n, n_pos, self.sequence_bytes(n_pos, itemsize), h.shape[-1],
                              x_eval.device)
        return forward_edge_squares(run, x_eval, h, C_pinv, out_basis, alphas=alphas,
                                    weights=weights, chunk=chunk)

    def edge_route(self, k_in: int, k_out: int, n_probes: int | None) -> str:
        """The cheapest route for this section's edges (``"probes"`` only with ``n_probes``)."""
        return edge_route(k_in, k_out, self.n_out_pos, n_probes)


class ModelSection(Section):
    """The section as the user's model runs it: ``tokens`` through the model with ``x``
    written at the input site, the output site read (:meth:`Adapter.run`), differentiated
    by autograd."""

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.adapter.run(tokens, read=self.out_site, write=(self.in_site, x))
