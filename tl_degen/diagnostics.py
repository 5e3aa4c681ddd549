"""The three kinds of degeneracy per site (DESIGN.md §2), and invariance checks.

* **Type 1** (activation degeneracy): directions of the site along which the data never
  varies: the null space of the centered activation Gram (§4 step 3).
* **Type 2** (Jacobian degeneracy): directions the data does visit but nothing downstream
  depends on: the null space of the Jacobian Gram within the data span (§4 step 5).
* **Type 3** (co-firing nonlinearities): MLP neurons whose firing sets on the data coincide
  (Jaccard index ≥ ``1 − jaccard_tolerance``; "fires" means pre-activation > 0; the data are
  the positions of the layer's ``mlp_post`` site, or all positions), and attention heads of
  one layer whose patterns coincide (max difference ≤ ``pattern_tolerance``). Neurons that
  never fire are reported as dead, not as co-firing; neurons that always fire co-fire (they
  act as one linear unit).

Free parameter directions: a type-1 direction ``v`` of site ``l`` lets every weight matrix
that *reads* the site change by ``v ⊗ w`` without changing the function on the data
(``n₁ · m_read`` directions); a type-2 direction lets every matrix that *writes* the site change
by ``w ⊗ v`` without changing it to first order (``n₂ · m_write``). The widths ``m`` count
the rows/columns of the adjacent linear maps of a LayerNorm-free transformer (bias
included); where a LayerNorm or a nonlinearity sits between the site and the weights the
count is not linear and is reported as ``None``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen import checks
from tl_degen.adapters import get_adapter
from tl_degen.basis import AMBIGUOUS_GAP, Threshold
from tl_degen.basis_set import BasisSet
from tl_degen.distributed import Shards
from tl_degen.effective import EffectiveParameters, effective_parameters
from tl_degen.errors import (
    ArgumentError,
    BasisMismatchError,
    DataError,
    DistributedError,
    TLDegenError,
    UnknownKeyError,
)
from tl_degen.fitting import fit_bases, site_activations, token_batches
from tl_degen.io import Serialisable
from tl_degen.model_state import prepared
from tl_degen.patching import patch_directions
from tl_degen.reparam import get_reparameterisation
from tl_degen.sites import Site, parse_sites

__all__ = ["degeneracy_report", "DegeneracyReport", "SiteDegeneracy", "LayerDegeneracy",
           "check_invariance", "InvarianceReport", "INVARIANCE_TARGETS"]


# ---------------------------------------------------------------------------- report data
@dataclass
class SiteDegeneracy(Serialisable):
    """Types 1 and 2 at one site (dimensions include the constant coordinate).

    ``to_dict()`` is the constructor's arguments, ``{"site": name, "dim", "activation_rank",
    "jacobian_rank", "free_read", "free_write", "gap"}``; ``from_dict`` / ``save`` / ``load``
    round-trip it (:class:`tl_degen.io.Serialisable`).
    """

    site: str
    dim: int
    activation_rank: int
    jacobian_rank: int
    free_read: int | None
    free_write: int | None
    #: the narrower spectral gap at the site's two cuts (:attr:`tl_degen.basis.Dropped.gap`)
    gap: float = float("inf")

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict) -> SiteDegeneracy:
        return cls(**d)

    @property
    def ambiguous(self) -> bool:
        """No spectral gap at a cut: the ranks depend on the threshold."""
        return self.gap < AMBIGUOUS_GAP

    @property
    def type1(self) -> int:
        """Directions the data never visits."""
        return self.dim - self.activation_rank

    @property
    def type2(self) -> int:
        """Visited directions nothing downstream reads."""
        return self.activation_rank - self.jacobian_rank


@dataclass
class LayerDegeneracy(Serialisable):
    """Type 3 in one layer: dead and co-firing MLP neurons, heads with identical patterns.

    ``to_dict()`` is the constructor's arguments, ``{"layer", "d_mlp", "dead_neurons": [...],
    "cofiring_groups": [[...]], "n_heads", "identical_head_groups": [[...]]}``;
    ``from_dict`` / ``save`` / ``load`` round-trip it (:class:`tl_degen.io.Serialisable`).
    """

    layer: int
    d_mlp: int | None
    dead_neurons: list[int] = field(default_factory=list)
    cofiring_groups: list[list[int]] = field(default_factory=list)
    n_heads: int = 0
    identical_head_groups: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"layer": self.layer, "d_mlp": self.d_mlp,
                "dead_neurons": list(self.dead_neurons),
                "cofiring_groups": [list(g) for g in self.cofiring_groups],
                "n_heads": self.n_heads,
                "identical_head_groups": [list(g) for g in self.identical_head_groups]}

    @classmethod
    def from_dict(cls, d: dict) -> LayerDegeneracy:
        return cls(**d)

    @property
    def n_cofiring(self) -> int:
        """Redundant neurons: Σ (group size − 1)."""
        return sum(len(g) - 1 for g in self.cofiring_groups)

    @property
    def n_identical_heads(self) -> int:
        return sum(len(g) - 1 for g in self.identical_head_groups)


@dataclass
class DegeneracyReport(Serialisable):
    """Per-site types 1–2 and per-layer type 3; ``print(report)`` shows the tables.

    With ``effective`` (from ``degeneracy_report(..., effective=True)``) a third table puts,
    per block and for the whole model: the raw parameter count, the effective parameter count
    ``N_eff = 2λ`` of the behavioural loss (:func:`~tl_degen.effective_parameters`) and the
    interaction-basis size (kept LIB directions) of each of the block's sites.

    ``to_dict()`` gives the constructor's arguments, ``{"sites": [SiteDegeneracy.to_dict()],
    "layers": [LayerDegeneracy.to_dict()], "config": {...}, "effective":
    EffectiveParameters.to_dict() or None, "lib_sizes": {site: k}}``; ``from_dict`` /
    ``save`` / ``load`` round-trip it (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is a
    JSON summary with the derived counts (``type1``, ``n_cofiring``, ...) added.

    Examples:
        >>> report = tl_degen.degeneracy_report(model, tokens, bases.sites, bases=bases)
        >>> report.site("resid_mid.0:last").type1, report.site("resid_mid.0:last").type2
        >>> report.layer(0).dead_neurons, report.as_dict()["sites"]
    """

    sites: list[SiteDegeneracy]
    layers: list[LayerDegeneracy]
    config: dict = field(default_factory=dict)
    effective: EffectiveParameters | None = None
    #: kept LIB directions per site name (the interaction-basis size)
    lib_sizes: dict[str, int] = field(default_factory=dict)

    def site(self, name: str) -> SiteDegeneracy:
        key = Site.parse(name).name
        for s in self.sites:
            if s.site == key:
                return s
        raise UnknownKeyError(f"no site {key!r} in this report: {[s.site for s in self.sites]}")

    def layer(self, L: int) -> LayerDegeneracy:
        for x in self.layers:
            if x.layer == L:
                return x
        raise UnknownKeyError(f"no layer {L} in this report")

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"sites": [s.to_dict() for s in self.sites],
                "layers": [x.to_dict() for x in self.layers], "config": dict(self.config),
                "effective": None if self.effective is None else self.effective.to_dict(),
                "lib_sizes": dict(self.lib_sizes)}

    @classmethod
    def from_dict(cls, d: dict) -> DegeneracyReport:
        """Rebuild from :meth:`to_dict`."""
        effective = d.get("effective")
        if effective is not None:
            effective = EffectiveParameters.from_dict(effective)
        return cls([SiteDegeneracy.from_dict(s) for s in d["sites"]],
                   [LayerDegeneracy.from_dict(x) for x in d["layers"]],
                   dict(d.get("config") or {}), effective=effective,
                   lib_sizes=dict(d.get("lib_sizes") or {}))

    def as_dict(self) -> dict:
        """A JSON summary: :meth:`to_dict` with the derived counts added."""
        return {
            "sites": [{**vars(s), "type1": s.type1, "type2": s.type2,
                       "ambiguous": s.ambiguous} for s in self.sites],
            "layers": [{**vars(x), "n_cofiring": x.n_cofiring,
                        "n_identical_heads": x.n_identical_heads} for x in self.layers],
            "config": self.config,
            "effective": None if self.effective is None else self.effective.as_dict(),
            "lib_sizes": dict(self.lib_sizes),
        }

    def table(self) -> str:
        def fmt(v):
            return "-" if v is None else str(v)

        w = max([len(s.site) for s in self.sites] + [4])
        head = (f"{'site':<{w}}  {'dim':>5} {'act rank':>8} {'jac rank':>8} {'type 1':>6} "
                f"{'type 2':>6} {'free (read)':>11} {'free (write)':>12} {'gap':>9}")
        rows = [head, "-" * len(head)]
        for s in self.sites:
            gap = f"{s.gap:.2g}×" + (" !" if s.ambiguous else "  ")
            rows.append(f"{s.site:<{w}}  {s.dim:>5} {s.activation_rank:>8} {s.jacobian_rank:>8} "
                        f"{s.type1:>6} {s.type2:>6} {fmt(s.free_read):>11} "
                        f"{fmt(s.free_write):>12} {gap:>9}")
        if any(s.ambiguous for s in self.sites):
            rows.append(f"! no spectral gap at the cut (within {AMBIGUOUS_GAP:g}×): the ranks "
                        "there depend on the threshold, not only on the model and the data")
        rows.append("")
        head = (f"{'layer':<6} {'dead neurons':>12} {'co-firing groups':>16} "
                f"{'redundant neurons':>17} {'identical-head groups':>21}")
        rows += [head, "-" * len(head)]
        for x in self.layers:
            groups = "; ".join("{" + ",".join(map(str, g)) + "}" for g in
                               x.cofiring_groups[:3] + x.identical_head_groups[:3])
            rows.append(f"{x.layer:<6} {len(x.dead_neurons):>12} {len(x.cofiring_groups):>16} "
                        f"{x.n_cofiring:>17} {len(x.identical_head_groups):>21}"
                        + (f"   e.g. {groups}" if groups else ""))
        if self.effective is not None:
            rows += ["", self.effective_table()]
        return "\n".join(rows)

    def effective_table(self) -> str:
        """Per group: parameters, ``N_eff ± se``, and the LIB size of each site in the group."""
        if self.effective is None:
            raise TLDegenError("this report has no effective parameter counts; pass "
                               "effective=True to degeneracy_report")
        w = max([len(e.group) for e in self.effective] + [5])
        head = (f"{'group':<{w}}  {'parameters':>10}  {'N_eff':>9}  {'± se':>7}  "
                "LIB size (kept directions per site)")
        rows = [head, "-" * len(head)]
        for e in self.effective:
            parts = e.group.split(".")
            if e.group == "model":
                layer = None
            elif len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
                layer = int(parts[1])
            else:  # a group of no one block (embed, unembed, a custom mapping): no sites
                layer = -1
            sizes = ", ".join(f"{name} {k}" for name, k in self.lib_sizes.items()
                              if layer is None or Site.parse(name).layer == layer)
            rows.append(f"{e.group:<{w}}  {e.n_params:>10}  {e.n_eff:>9.4g}  "
                        f"{e.n_eff_se:>7.2g}  {sizes}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"DegeneracyReport({self.config})\n{self.table()}"


# ---------------------------------------------------------------------------- report
def degeneracy_report(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    sites: Sequence[str | Site],
    *,
    bases: BasisSet | None = None,
    threshold: float | Threshold = 1e-10,
    jaccard_tolerance: float = 0.0,
    pattern_tolerance: float = 1e-6,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    n_probes: int | None = None,
    target_error: float | None = None,
    progress: bool = True,
    effective: bool | EffectiveParameters = False,
    effective_kwargs: dict | None = None,
    distributed: bool | None = None,
) -> DegeneracyReport:
    """Count the three kinds of degeneracy on the data (module docstring for definitions).

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        tokens: ``[batch, pos]`` data.
        sites: sites in forward order, ending with the logits (as for :func:`fit_bases`).
        bases: LIB bases of these sites fitted on ``tokens`` (fitted here when omitted).
        threshold: eigenvalue cutoff of the LIB fit (relative), deciding the ranks.
        jaccard_tolerance: neurons co-fire when their firing sets' Jaccard index is at least
            ``1 − jaccard_tolerance`` (0: identical sets).
        pattern_tolerance: heads coincide when their patterns differ by at most this.
        batch_size, dtype, n_probes, target_error: as in :func:`~tl_degen.fit_bases`, for
            the fit when ``bases`` is omitted (a language model: ``dtype=torch.float32,
            n_probes=32``). The firing-set and attention-pattern passes run in the model's
            own dtype.
        effective: ``True`` estimates the effective parameter count ``N_eff`` of the whole
            model and of every block that holds a site (:func:`~tl_degen.effective_parameters`,
            outputs compared at the last site's positions); or pass an
            :class:`~tl_degen.EffectiveParameters` computed before.
        effective_kwargs: keyword arguments for :func:`~tl_degen.effective_parameters`
            (``lr``, ``num_draws``, ``seed``, ...).
        distributed: inside a ``torch.distributed`` process group each rank passes its own
            shard of ``tokens``; the fit and the firing-set counts are reduced over ranks and
            every rank returns the same report (:mod:`tl_degen.distributed`; ``False`` opts
            out). ``effective=True`` is not sharded: pass a precomputed estimate instead.

    Returns:
        A :class:`DegeneracyReport`; ``print(report)`` shows the tables.

    Examples:
        >>> rep = tl_degen.degeneracy_report(model, tokens, ["resid_pre.0", "resid_mid.0:last",
        ...                                  "mlp_post.0:last", "resid_post.0:last", "logits:last"])
        >>> rep.site("mlp_post.0:last").type1, rep.layer(0).n_cofiring
    """
    shards = Shards(distributed)
    with shards.step("degeneracy_report (checking the arguments)"):
        checks.number("jaccard_tolerance", jaccard_tolerance, minimum=0, below=1)
        checks.number("pattern_tolerance", pattern_tolerance, minimum=0)
        _check_effective(model, effective, effective_kwargs)  # before any work
        if shards.active and effective is True:
            raise DistributedError(
                "effective=True samples the posterior of one process's loss and is not "
                "sharded; compute tl_degen.effective_parameters on the tokens of one process "
                "and pass the result as effective=..., or call with distributed=False")
    if bases is None:
        bases = fit_bases(model, tokens, sites, method="lib", threshold=threshold,
                          batch_size=batch_size, dtype=dtype, n_probes=n_probes,
                          target_error=target_error, progress=progress,
                          distributed=distributed)
    elif checks.instance("bases", bases, BasisSet, "fit_bases").method != "lib":
        raise TLDegenError(f"the degeneracy report needs LIB bases (method='lib'), got "
                           f"{bases.method!r}")
    else:
        bases.check_model(model)
    adapter = get_adapter(model)
    ln = not adapter.arch.no_norm
    rows = []
    for s in parse_sites(sites):
        if s.kind == "logits":
            continue
        b = bases[s]
        rank = b.d_site - b.dropped.activation
        read, write = _widths(adapter, s, ln)
        rows.append(SiteDegeneracy(
            s.name, b.d_site, rank, b.k,
            None if read is None else (b.d_site - rank) * read,
            None if write is None else (rank - b.k) * write, gap=b.dropped.gap))
    layers = sorted({s.layer for s in parse_sites(sites) if s.kind != "logits"})
    mlp_sites = {s.layer: s for s in parse_sites(sites) if s.kind == "mlp_post"}
    type3 = _type3(model, adapter, tokens, layers, mlp_sites, jaccard_tolerance,
                   pattern_tolerance, batch_size, progress, shards)
    if effective is True:
        kwargs = {"progress": progress, **(effective_kwargs or {})}
        if "positions" not in kwargs:
            last = parse_sites(sites)[-1]
            n_pos = token_batches(tokens, batch_size, adapter)[0].shape[1]
            kwargs["positions"] = (last.resolve_positions(n_pos) if last.kind == "logits"
                                   else "all")
        effective = effective_parameters(
            model, tokens, ["model"] + [f"blocks.{L}" for L in layers], **kwargs)
    elif effective is False or effective is None:
        effective = None
    return DegeneracyReport(rows, type3, {
        "threshold": str(bases.config.get("threshold", threshold)),
        "jaccard_tolerance": jaccard_tolerance, "pattern_tolerance": pattern_tolerance,
        "n_samples": bases.config.get("n_samples")}, effective=effective,
        lib_sizes={s.name: bases[s].k for s in parse_sites(sites) if s.kind != "logits"})


def _check_effective(model, effective, effective_kwargs) -> None:
    if effective_kwargs is not None:
        if not isinstance(effective_kwargs, dict):
            raise TLDegenError("effective_kwargs must be a dict of effective_parameters "
                               f"arguments, got {type(effective_kwargs).__name__}")
        unknown = set(effective_kwargs) - set(inspect.signature(effective_parameters).parameters)
        if unknown:
            raise TLDegenError(f"effective_kwargs has {sorted(unknown)}, which "
                               "effective_parameters does not take")
    if effective is True:
        if "params" in (effective_kwargs or {}):
            raise TLDegenError("effective_kwargs cannot choose params: the report estimates the "
                               "whole model and each block; call effective_parameters for "
                               "other groups and pass the result as effective=")
    elif effective not in (False, None) and not isinstance(effective, EffectiveParameters):
        raise TLDegenError("effective must be True, False or an EffectiveParameters result")
    elif isinstance(effective, EffectiveParameters) and "model" in effective.estimates:
        total = sum(p.numel() for p in model.parameters())
        if effective["model"].n_params != total:
            raise BasisMismatchError(
                f"the EffectiveParameters were estimated on a model of "
                f"{effective['model'].n_params} parameters; this one has {total}")


def _widths(adapter, site: Site, ln: bool) -> tuple[int | None, int | None]:
    """Widths (incl. bias) of the linear maps reading and writing ``site``; None if not linear."""
    if ln or adapter.parallel:
        return None, None
    d_head, n_kv = adapter.arch.d_head, adapter.arch.n_key_value_heads
    qkv = (adapter.n_heads + 2 * n_kv) * d_head
    L = site.layer
    last = L == adapter.n_layers - 1
    d_mlp = adapter.d_mlp or 0
    if site.kind == "resid_pre":
        write = adapter.d_vocab + adapter.n_ctx if L == 0 else d_mlp + 1
        return qkv, write
    if site.kind == "resid_mid":
        return d_mlp, adapter.n_heads * d_head + 1
    if site.kind == "resid_post":
        return (adapter.d_vocab_out if last else qkv), d_mlp + 1
    return None, None  # mlp_post: a nonlinearity writes it, W_out and the identity read it


def _union_find(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted([g for g in groups.values() if len(g) > 1])


def _type3(model, adapter, tokens, layers, mlp_sites, jaccard_tol, pattern_tol, batch_size,
           progress, shards):
    """Firing-set co-occurrence counts (at the positions of the layer's ``mlp_post`` site, all
    positions without one) and the largest pattern difference between heads; summed (counts)
    and maximised (differences) over the ranks of ``shards``."""
    batches = token_batches(tokens, batch_size, adapter)
    names = {}
    for L in layers:
        if adapter.d_mlp is not None and f"blocks.{L}.mlp.hook_pre" in adapter._hook_names:
            names[f"blocks.{L}.mlp.hook_pre"] = ("mlp", L)
        if f"blocks.{L}.attn.hook_pattern" in adapter._hook_names:
            names[f"blocks.{L}.attn.hook_pattern"] = ("attn", L)
    co: dict[int, Tensor] = {}
    diff: dict[int, Tensor] = {}
    with shards.step("degeneracy_report (firing sets)"), prepared(model, None), \
            torch.no_grad():
        for b in tqdm(batches, desc="firing sets", disable=not progress):
            seen: dict[str, Tensor] = {}
            hooks = [(n, lambda t, hook, n=n: seen.__setitem__(n, t.detach())) for n in names]
            with model.hooks(fwd_hooks=hooks):
                model(b)
            for n, (kind, L) in names.items():
                t = seen[n]
                if not torch.isfinite(t).all():
                    raise DataError(f"NaN or Inf values at {n}")
                if kind == "mlp":
                    if L in mlp_sites:
                        t = t[:, mlp_sites[L].resolve_positions(t.shape[1])]
                    fires = (t.reshape(-1, t.shape[-1]) > 0).double()
                    co[L] = co.get(L, 0) + fires.T @ fires
                else:  # [batch, head, dest, src]; one head pair at a time (memory)
                    H = t.shape[1]
                    d = torch.zeros(H, H, dtype=torch.float64)
                    for i in range(H):
                        for j in range(i + 1, H):
                            d[i, j] = d[j, i] = float((t[:, i] - t[:, j]).abs().max())
                    diff[L] = torch.maximum(diff[L], d) if L in diff else d
    for L in sorted(co):  # every rank saw the same hooks, so holds the same keys
        co[L] = shards.sum(co[L])
    for L in sorted(diff):
        diff[L] = shards.max(diff[L])
    out = []
    for L in layers:
        rec = LayerDegeneracy(L, adapter.d_mlp, n_heads=adapter.n_heads)
        if L in co:
            c = co[L]
            count = c.diagonal()
            rec.dead_neurons = (count == 0).nonzero()[:, 0].tolist()
            union = count[:, None] + count[None, :] - c
            jac = torch.where(union > 0, c / union.clamp_min(1), torch.zeros_like(c))
            alive = count > 0
            ok = (jac >= 1 - jaccard_tol - 1e-12) & alive[:, None] & alive[None, :]
            ok.fill_diagonal_(False)
            rec.cofiring_groups = _union_find(c.shape[0], ok.nonzero().tolist())
        if L in diff:
            ok = diff[L] <= pattern_tol
            ok.fill_diagonal_(False)
            rec.identical_head_groups = _union_find(diff[L].shape[0], ok.nonzero().tolist())
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- invariance
#: LIB's promise under a function-preserving reparameterisation (issue 11): the largest
#: relative change allowed per quantity, on the directions with Λ above the band's floor.
INVARIANCE_TARGETS = {"eigenvalue_change": 1e-8, "eigenvalue_change_small": 1e-4,
                      "coordinate_change": 1e-6, "edge_change": 1e-6, "patching_change": 1e-6}
#: The bands: Λ above ``LEADING·max`` (``eigenvalue_change`` and every comparison of
#: coordinates, edges and patching), and above ``SMALL·max`` (``eigenvalue_change_small``).
LEADING, SMALL = 1e-8, 1e-12


@dataclass
class InvarianceReport(Serialisable):
    """How bases, graphs and patching results change under a function-preserving
    reparameterisation.

    ``rows``: one dict per (method, site) with ``k_before``, ``k_after`` (kept directions),
    ``n_leading`` / ``n_small`` (directions with eigenvalue above ``1e-8·max`` /
    ``1e-12·max`` of the first fit), ``eigenvalue_change`` (largest relative change of those
    above ``1e-8·max``), ``eigenvalue_change_small`` (the same above ``1e-12·max``),
    ``coordinate_change`` (relative change of the data's coordinates along the leading
    directions, up to sign and rotation within equal-eigenvalue groups), ``edge_change``
    (LIB: edges from the leading directions of this site to those of the next, relative to
    the largest edge; NaN otherwise), ``patching_change`` (per-direction patch effects,
    relative to the largest; NaN when no patching was asked for) and ``gap`` (the narrower
    spectral gap at the two fits' cuts, :attr:`tl_degen.basis.Dropped.gap`). ``inf`` marks a
    comparison the two fits cannot make (fewer kept directions than the band needs).

    ``to_dict()`` gives the constructor's arguments, ``{"transform": name,
    "function_change": float, "rows": [row dicts as above]}``; ``from_dict`` / ``save`` /
    ``load`` round-trip it (:class:`tl_degen.io.Serialisable`).

    Examples:
        >>> rep = tl_degen.check_invariance(model, tokens, bases.sites, "change_residual_basis")
        >>> print(rep)  # the table, with LIB's targets
        >>> rep.holds("lib"), rep.worst("pca", "eigenvalue_change")
    """

    transform: str
    function_change: float
    rows: list[dict]

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"transform": self.transform, "function_change": self.function_change,
                "rows": [dict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> InvarianceReport:
        return cls(d["transform"], d["function_change"], [dict(r) for r in d["rows"]])

    def worst(self, method: str, key: str = "patching_change") -> float:
        """Largest ``key`` over the method's sites (NaN entries ignored; NaN if none)."""
        known = set().union(*(r.keys() for r in self.rows)) - {"method", "site"}
        if key not in known:
            raise UnknownKeyError(f"no quantity {key!r} in this report; it has "
                                  f"{sorted(known)}")
        vals = [r[key] for r in self.rows if r["method"] == method and r[key] == r[key]]
        return max(vals) if vals else float("nan")

    def holds(self, method: str = "lib") -> bool:
        """Whether every measured quantity of ``method`` is within
        :data:`INVARIANCE_TARGETS` at every site."""
        return all(not (r[k] > t) for r in self.rows if r["method"] == method
                   for k, t in INVARIANCE_TARGETS.items())

    def table(self) -> str:
        head = (f"{'method':<7} {'site':<20} {'k':>9} {'Λ>1e-8':>9} {'Λ>1e-12':>9} "
                f"{'coords':>9} {'edges':>9} {'patching':>9} {'gap':>8}")
        rows = [head, "-" * len(head)]

        def f(v):
            return f"{'-':>9}" if v != v else f"{v:>9.1e}"

        for r in self.rows:
            k = f"{r['k_before']}->{r['k_after']}"
            gap = f"{r['gap']:>7.2g}×" if r["gap"] == r["gap"] else f"{'-':>8}"
            rows.append(f"{r['method']:<7} {r['site']:<20} {k:>9} {f(r['eigenvalue_change'])} "
                        f"{f(r['eigenvalue_change_small'])} {f(r['coordinate_change'])} "
                        f"{f(r['edge_change'])} {f(r['patching_change'])} {gap}")
        t = INVARIANCE_TARGETS
        rows.append(f"LIB targets: Λ {t['eigenvalue_change']:.0e} (Λ > 1e-8·max), "
                    f"{t['eigenvalue_change_small']:.0e} (Λ > 1e-12·max); coordinates, edges, "
                    f"patching {t['coordinate_change']:.0e}. LIB "
                    + ("holds them." if self.holds("lib") else "does NOT hold them.")
                    if any(r["method"] == "lib" for r in self.rows) else "")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (f"InvarianceReport(transform={self.transform!r}, function change "
                f"{self.function_change:.1e})\n{self.table()}")


def check_invariance(
    model,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[str | Site],
    transform: str | Callable = "permute_neurons",
    *,
    methods: Sequence[str] = ("lib", "pca", "neuron"),
    clean_tokens: Tensor | None = None,
    corrupted_tokens: Tensor | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
    threshold: float | Threshold = 1e-13,
    edges: bool = True,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    n_probes: int | None = None,
    target_error: float | None = None,
    progress: bool = True,
) -> InvarianceReport:
    """Reparameterise the model without changing its function and compare, side by side,
    how LIB, PCA and neuron bases (LIB's graph, and per-direction patching results) change.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``. Load it in float64 for a
            sharp test: a reparameterisation in float32 changes the function by ~1e-7.
        tokens: data to fit the bases on.
        sites: sites in forward order, ending with the logits.
        transform: a built-in name (:data:`tl_degen.reparam.REPARAMETERISATIONS`:
            ``"permute_neurons"``, ``"rescale_neurons"``, ``"split_neuron"``,
            ``"add_dead_neurons"``, ``"change_residual_basis"``) or a function
            ``model -> new model`` computing the same function.
        threshold: as in :func:`~tl_degen.fit_bases`.
        edges: also compare LIB's interaction graphs.
        batch_size, dtype, n_probes, target_error: as in :func:`~tl_degen.fit_bases`, for the
            fits and graphs of both models (``n_probes``: the two models draw the same probes;
            estimated Grams differ by their error, so compare at ``n_probes=None`` where it
            fits).
        clean_tokens, corrupted_tokens, metric: if given, every direction of every site is
            patched (denoising) in both models and the effects compared.

    Returns:
        An :class:`InvarianceReport`; ``print`` it for the table with LIB's targets
        (:data:`INVARIANCE_TARGETS`).

    Examples:
        >>> rep = tl_degen.check_invariance(model, tokens, sites, "rescale_neurons",
        ...                                 clean_tokens=clean, corrupted_tokens=corrupt,
        ...                                 metric=logit_diff)
        >>> print(rep)
    """
    from tl_degen.graph import interaction_graph

    if isinstance(methods, str) or not methods or any(m not in ("lib", "pca", "neuron")
                                                      for m in methods):
        raise TLDegenError(f"methods must be a non-empty list of 'lib', 'pca', 'neuron', got "
                           f"{methods!r}")
    name, fn = get_reparameterisation(transform)
    if (clean_tokens is None) != (metric is None) or (clean_tokens is None) != (
            corrupted_tokens is None):
        raise TLDegenError("for patching give clean_tokens, corrupted_tokens and metric together")
    new = fn(model)
    if not isinstance(new, torch.nn.Module) or type(new) is not type(model):
        raise ArgumentError(f"transform: {name!r} returned {type(new).__name__}; it must "
                            f"return the reparameterised model (a {type(model).__name__}), e.g. "
                            "lambda m: my_reparameterise(copy.deepcopy(m))")
    probe = token_batches(tokens, 1 << 62, get_adapter(model))[0][:64]
    with torch.no_grad(), prepared(model, None), prepared(new, None):
        before, after = model(probe).double(), new(probe).double()
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    eps = torch.finfo(next(model.parameters()).dtype).eps
    if change > max(1e-6, 1e4 * eps):
        raise TLDegenError(f"the transform {name!r} changed the model's logits by {change:.2e} "
                           "(relative); it must preserve the function")
    parsed = parse_sites(sites)
    rows = []
    for method in tqdm(list(methods), desc=f"invariance under {name}", disable=not progress):
        fits = [fit_bases(m, tokens, parsed, method=method, threshold=threshold,
                          batch_size=batch_size, dtype=dtype, n_probes=n_probes,
                          target_error=target_error, progress=False) for m in (model, new)]
        graphs = None
        if method == "lib" and edges:
            graphs = [interaction_graph(m, tokens, f, batch_size=batch_size, dtype=dtype,
                                        n_probes=n_probes, progress=False)
                      for m, f in zip((model, new), fits)]
        for i, s in enumerate(parsed):
            if s.kind == "logits":
                continue
            b0, b1 = fits[0][s], fits[1][s]
            lam0, lam1 = b0.eigenvalues.double(), b1.eigenvalues.double()
            top = lam0.abs().max()
            n_lead = int((lam0.abs() > LEADING * top).sum())
            n_small = int((lam0.abs() > SMALL * top).sum())
            gap = (min(b0.dropped.gap, b1.dropped.gap) if method == "lib" else float("nan"))
            row = {"method": method, "site": s.name, "k_before": b0.k, "k_after": b1.k,
                   "n_leading": n_lead, "n_small": n_small,
                   "eigenvalue_change": float("inf"), "eigenvalue_change_small": float("inf"),
                   "coordinate_change": float("inf"),
                   "edge_change": float("inf") if graphs else float("nan"),
                   "patching_change": float("nan") if metric is None else float("inf"),
                   "gap": gap}
            rows.append(row)

            def rel(n):
                return float(((lam1[:n] - lam0[:n]).abs() / lam0[:n].abs().clamp_min(1e-300)
                              ).max()) if n else 0.0

            if b1.k < n_lead:
                continue
            row["eigenvalue_change"] = rel(n_lead)
            if b1.k >= n_small:
                row["eigenvalue_change_small"] = rel(n_small)
            lead = slice(0, n_lead)
            c0 = b0.to_coords(site_activations(model, tokens, s, batch_size=batch_size))
            c1 = b1.to_coords(site_activations(new, tokens, s, batch_size=batch_size))
            row["coordinate_change"] = _coordinate_change(c0[..., lead], c1[..., lead],
                                                          lam0[lead])
            if graphs is not None and i + 1 < len(parsed):
                nxt = parsed[i + 1]
                n_out = (fits[0][nxt].k if nxt.kind == "logits" else
                         int((fits[0][nxt].eigenvalues.abs()
                              > LEADING * fits[0][nxt].eigenvalues.abs().max()).sum()))
                e0, e1 = graphs[0].edge(s, nxt), graphs[1].edge(s, nxt)
                if e1.shape[0] >= n_out:
                    d = (e1[:n_out, lead] - e0[:n_out, lead]).abs().max()
                    row["edge_change"] = float(d / e0.abs().max().clamp_min(1e-300))
            elif graphs is not None:
                row["edge_change"] = float("nan")
            if metric is not None:
                p0 = patch_directions(model, clean_tokens, corrupted_tokens, fits[0], s,
                                      metric, dtype=dtype, progress=False).effects
                p1 = patch_directions(new, clean_tokens, corrupted_tokens, fits[1], s,
                                      metric, dtype=dtype, progress=False).effects
                row["patching_change"] = float((p1[lead] - p0[lead]).abs().max() /
                                               p0.abs().max().clamp_min(1e-30))
    return InvarianceReport(name, change, rows)


def _coordinate_change(a: Tensor, b: Tensor, lam: Tensor) -> float:
    """Relative difference of two coordinate sets up to sign and rotation inside groups of
    (relatively) equal eigenvalues."""
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    worst, i = 0.0, 0
    while i < len(lam):
        j = i + 1
        while j < len(lam) and abs(lam[j] - lam[j - 1]) <= 1e-6 * abs(lam[j - 1]):
            j += 1
        u, _, vh = torch.linalg.svd(b[:, i:j].T @ a[:, i:j])
        err = (b[:, i:j] @ (u @ vh) - a[:, i:j]).norm() / a[:, i:j].norm().clamp_min(1e-30)
        worst, i = max(worst, float(err)), j
    return worst
