"""One section between two sites, planned once: which implementation computes its Jacobian
Gram and its edges on each batch.

Both verbs need the same things of a section ``f`` between consecutive sites (DESIGN.md §4),
batch by batch: its Jacobian Gram ``Σ J K Jᵀ`` (§4 step 4) for :func:`tl_degen.fit_bases`
and its edge squares ``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8) for
:func:`tl_degen.interaction_graph`; :class:`~tl_degen.sections.reader.BatchReader` and the
ablations need its forward pass. :class:`SectionPlan` chooses, once per section and prompt
length, among the implementations of :class:`~tl_degen.sections.base.Section`:

* **closed form** (:mod:`tl_degen.sections.recognise`): MLP, attention, linear and unembedding
  sections without normalisation, checked against the model's own forward pass and one
  vector-Jacobian product on the first batch of each length. Attention after a LayerNorm or
  RMSNorm has its formula only: the autograd routes below then differentiate that formula
  instead of the model (route names end in "(section formula)");
* **autograd** (:class:`~tl_degen.sections.base.ModelSection`, or the formula): exact, by the
  cheapest of forward mode and backward mode (:func:`~tl_degen.sections.autograd.edge_route`,
  :func:`~tl_degen.sections.autograd.gram_route`);
* **probes** (:class:`~tl_degen.sections.probes.ProbedSection`): random-sign probes with their
  standard error, when ``n_probes`` is given and probing costs less than half the exact route.

This module is the only caller of recognition.

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
from tl_degen.errors import SiteError
from tl_degen.sections.autograd import gram_route
from tl_degen.sections.base import ModelSection, Section
from tl_degen.sections.probes import ProbedSection, StochasticEstimate
from tl_degen.sections.recognise import may_have_closed_form, recognise
from tl_degen.sections.unembed import logit_factor
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["SectionPlan", "accumulate_jacobian_gram"]


class SectionPlan:
    """How the section ``in_site → out_site`` is computed, chosen once per prompt length.

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
        self._closed: dict[int, Section | None] = {}
        self._model: dict[int, ModelSection] = {}
        self._logit_Q: Tensor | None | bool = None  # False: the raw logits stay raw

    def __repr__(self) -> str:
        used = ", ".join(sorted(self.routes)) or "nothing yet"
        return f"SectionPlan({self.in_site.name} → {self.out_site.name}; used: {used})"

    @property
    def may_have_closed_form(self) -> bool:
        """Whether the plan looks for a closed form and the section's shape allows one
        (known without reading anything)."""
        return self.closed_form and may_have_closed_form(self.adapter, self.in_site,
                                                         self.out_site)

    # ------------------------------------------------------------------ choosing
    def closed(self, tokens: Int[Tensor, "batch pos"], x: Tensor,
               y: Tensor | None = None) -> Section | None:
        """The section's closed form (or formula) for prompts of this length, recognised
        and checked against the model on the first batch of that length; ``y``: the output
        site's vectors on ``tokens``, when already read."""
        if not self.closed_form:
            return None
        n_pos = tokens.shape[1]
        if n_pos not in self._closed:
            self._closed[n_pos] = recognise(self.adapter, tokens, self.in_site,
                                            self.out_site, x, y)
        return self._closed[n_pos]

    def _exact(self, tokens, x, y) -> Section | None:
        """The closed form, where its Gram and edges are closed forms too."""
        section = self.closed(tokens, x, y)
        return section if section is not None and section.closed_form else None

    def _autograd(self, tokens, x, y) -> Section:
        """What autograd differentiates: the section's formula where it has one, else the
        model."""
        section = self.closed(tokens, x, y)
        if section is not None:
            return section
        n_pos = tokens.shape[1]
        if n_pos not in self._model:
            self._model[n_pos] = ModelSection(self.adapter, self.in_site, self.out_site, n_pos)
        return self._model[n_pos]

    def gram_section(self, tokens: Int[Tensor, "batch pos"], x: Tensor,
                     out_basis: Tensor | None, y: Tensor | None = None) -> Section:
        """The section that computes this batch's Jacobian Gram."""
        exact = self._exact(tokens, x, y)
        if exact is not None:
            return exact
        section = self._autograd(tokens, x, y)
        k_out = section.k_out(self._raw_logits(out_basis, x))
        if gram_route(k_out, section.n_out_pos, self.n_probes) == "probes":
            return ProbedSection(section, self.n_probes, self.n_groups, self.generator)
        return section

    def _raw_logits(self, out_basis: Tensor | None, x: Tensor) -> Tensor | None:
        """The output basis autograd differentiates into: for the raw logits of a large
        vocabulary, their factor space ``Q`` (``r`` directions instead of ``V``; the same
        Jacobian Gram, :mod:`tl_degen.sections.unembed`), else ``out_basis`` itself."""
        if out_basis is not None or self.out_site.kind != "logits":
            return out_basis
        if self._logit_Q is None:
            try:
                factor = logit_factor(self.adapter)
            except SiteError:  # soft-capped logits: no factor space, the raw logits
                factor = None
            self._logit_Q = False if factor is None else factor.Q.to(x.device, x.dtype)
        return None if self._logit_Q is False else self._logit_Q

    def gram_is_probed(self, tokens: Int[Tensor, "batch pos"], x: Tensor,
                       out_basis: Tensor | None, y: Tensor | None = None) -> bool:
        """Whether this batch's Jacobian Gram is estimated with probes (else exact)."""
        return isinstance(self.gram_section(tokens, x, out_basis, y), ProbedSection)

    # ------------------------------------------------------------------ computing
    def add_jacobian_gram(
        self, tokens: Int[Tensor, "batch pos"], x: Float[Tensor, "batch n_in d_in"],
        out_basis: Float[Tensor, "d_out k"] | None, acc: GramAccumulator,
        y: Tensor | None = None,
    ) -> StochasticEstimate | None:
        """Add this batch's exact ``Σ J K Jᵀ`` (§4 step 4) and ``N·P_in`` to ``acc``; or, where
        the plan probes, leave ``acc`` alone and return the estimate (its groups are sums over
        the batch, to be added to ``acc`` once complete)."""
        section = self.gram_section(tokens, x, out_basis, y)
        self._record(section, "probes" if isinstance(section, ProbedSection) else "backward")
        if not section.closed_form:
            out_basis = self._raw_logits(out_basis, x)
        return section.add_jacobian_gram(x, out_basis, acc, self.alphas, self.weights, tokens)

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
        section = self._exact(tokens, x, y)
        route = None
        if section is None:
            section = self._autograd(tokens, x, y)
            route = self.route or section.edge_route(h.shape[-1], section.k_out(out_basis),
                                                     self.n_probes)
            if route == "probes":
                section = ProbedSection(section, self.n_probes, self.n_groups, self.generator)
        self._record(section, route)
        return section.edge_squares(x_proj, h, C_pinv, out_basis, self.alphas, self.weights,
                                    tokens, route)

    def _record(self, section: Section, route: str | None) -> None:
        self.routes.add("closed form" if section.closed_form
                        else f"{route}{section.route_suffix}")


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
        closed_form: use a closed form where the section has one.
    """
    SectionPlan(adapter, in_site, out_site, alphas=alphas, weights=weights,
                closed_form=closed_form).add_jacobian_gram(tokens, x, out_basis, acc)
