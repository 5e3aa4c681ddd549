"""The sites' vectors of each batch, for the verbs that walk the batches more than once.

:func:`tl_degen.fit_bases` reads every site of a batch for its statistics and then one site
at a time for each section's Jacobians; :func:`tl_degen.interaction_graph` reads every input
site once per pair. :class:`BatchReader` serves both: one computation per batch, kept while
it fits, and, where the sections between the sites are closed forms, most of it by formula
instead of the model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.memory import memory_budget
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.recognise import CHECK_ROWS
from tl_degen.sites import Site

__all__ = ["BatchReader"]


class BatchReader:
    """Batch ``i``'s vectors at each of ``sites``, ``[batch, n_site_positions, d_site (+1)]``
    with the constant coordinate last, as :meth:`Adapter.read_sites` gives them.

    * **Kept.** Every site of every batch is kept after its first computation while all of
      them fit a quarter of the memory budget (:func:`tl_degen.memory.memory_budget`).
      Beyond that nothing is kept, and a read of one site computes again, its forward pass
      stopping at that site.
    * **Through the sections' formulas.** With ``plans`` (the :class:`SectionPlan` of each
      pair of consecutive ``sites``): when every section has a closed form, recognised on
      the first batch of each prompt length and checked against one model pass that reads
      every site on :data:`~tl_degen.sections.recognise.CHECK_ROWS` sequences, only the
      first site is read from the model, its forward pass stopping there. Each later site is
      then the previous one through its section's formula
      (:meth:`~tl_degen.sections.base.Section.forward`).

      The formulas must match the model's pass to ``10⁴·eps`` of the largest entry, against
      the ``1e-7`` of recognition alone. Each formula computes only the positions its site
      reads (an MLP into a ``:last`` site runs at the last position only) and calls no hooks,
      which is why this is cheaper than the model's own pass.

    Args:
        adapter: the model's adapter, the model already in the dtype of the passes.
        batches: ``[batch, pos]`` token batches.
        sites: the sites to read, in forward order.
        plans: ``len(sites) - 1`` plans, ``plans[k]`` for ``sites[k] → sites[k + 1]``;
            ``None``: every read from the model.
        after: the plan of the section after the last site, if any. Where it may have a
            closed form, its output site is read in the same check pass and the plan is
            recognised there, so that its recognition runs no model pass of its own. It takes
            no part in the decision, and its output is never read again.

    Examples:
        >>> reader = BatchReader(adapter, batches, sites, plans)
        >>> xs = reader.all(0)          # every site of batch 0
        >>> x = reader.read(0, 2)       # site 2 of batch 0 (kept, or computed again)
    """

    def __init__(self, adapter: Adapter, batches: list[Tensor], sites: list[Site],
                 plans: list[SectionPlan] | None = None, after: SectionPlan | None = None):
        if plans is not None and len(plans) != len(sites) - 1:
            raise ValueError(f"{len(sites)} sites need {len(sites) - 1} plans, got {len(plans)}")
        self.adapter, self.batches, self.sites, self.plans = adapter, batches, sites, plans
        self.after = after if after is not None and after.may_have_closed_form else None
        itemsize = torch.finfo(adapter.dtype).bits // 8
        total = sum(b.shape[0] * len(s.resolve_positions(b.shape[1]))
                    * (adapter.site_dim(s) + 1) * itemsize for b in batches for s in sites)
        self._kept: dict[int, list[Tensor]] | None = (
            {} if total <= memory_budget(adapter.device) // 4 else None)
        self._by_formula: dict[int, bool] = {}  # prompt length → sites after the first by formula

    def __repr__(self) -> str:
        lengths = ", ".join(f"{n}: {'formulas' if f else 'model'}"
                            for n, f in sorted(self._by_formula.items())) or "none yet"
        kept = "kept" if self._kept is not None else "not kept (over a quarter of the budget)"
        return (f"BatchReader({len(self.batches)} batches, sites "
                f"{', '.join(s.name for s in self.sites)}; {kept}; read by prompt length: "
                f"{lengths})")

    def all(self, i: int) -> list[Float[Tensor, "batch n_pos d"]]:
        """Every site of batch ``i``."""
        if self._kept is not None and i in self._kept:
            return self._kept[i]
        xs = self._compute(i, len(self.sites))
        if self._kept is not None:
            self._kept[i] = xs
        return xs

    def read(self, i: int, index: int) -> Float[Tensor, "batch n_pos d"]:
        """Batch ``i``'s vectors at ``sites[index]``."""
        if self._kept is not None:
            return self.all(i)[index]
        if self._formulas(self.batches[i]):
            return self._compute(i, index + 1)[index]
        with torch.no_grad():
            return self.adapter.read_sites(self.batches[i], [self.sites[index]])[0]

    def kept(self, i: int, index: int) -> Tensor | None:
        """Batch ``i``'s vectors at ``sites[index]`` if already computed and kept, else
        ``None`` (nothing is computed)."""
        if self._kept is None or i not in self._kept:
            return None
        return self._kept[i][index]

    @torch.no_grad()
    def _compute(self, i: int, n: int) -> list[Tensor]:
        """The first ``n`` sites of batch ``i``."""
        b = self.batches[i]
        if not self._formulas(b):
            return self.adapter.read_sites(b, self.sites[:n])
        xs = self.adapter.read_sites(b, self.sites[:1])
        for plan in self.plans[:n - 1]:
            xs.append(plan.closed(b, xs[-1]).forward(xs[-1]))
        return xs

    def _formulas(self, b: Tensor) -> bool:
        """Whether the sites after the first come through the sections' formulas for
        prompts of ``b``'s length (decided on the first such batch)."""
        if not self.plans:
            return False
        n_pos = b.shape[1]
        if n_pos not in self._by_formula:
            self._by_formula[n_pos] = self._check_formulas(b)
        return self._by_formula[n_pos]

    def _check_formulas(self, b: Tensor) -> bool:
        if not all(p.may_have_closed_form for p in self.plans):
            return False  # known without reading anything
        rows = b[:CHECK_ROWS]
        extra = [self.after.out_site] if self.after is not None else []
        with torch.no_grad():
            model = self.adapter.read_sites(rows, self.sites + extra)
        if extra:
            with torch.enable_grad():
                self.after.closed(rows, model[-2], model.pop())  # recognised, kept by the plan
        for plan, x, y in zip(self.plans, model, model[1:]):
            with torch.enable_grad():  # recognition checks one vector-Jacobian product
                section = plan.closed(rows, x, y)
            if section is None:
                return False
            with torch.no_grad():
                out = section.forward(x)
            if out is None or out.shape != y.shape:
                return False
            tol = 1e4 * torch.finfo(y.dtype).eps * float(y.abs().max().clamp_min(1e-30))
            if float((out - y).abs().max()) > tol:
                return False
        return True
