"""Which basis explains a task: :func:`compare_bases`, :class:`BasisComparison`.

The paper's claim is comparative: the interaction basis should make a network's computation
more compact than PCA or neurons do. :func:`compare_bases` measures that on the user's own
task and sites, for LIB, PCA, neurons and any basis the user brings:

- **cumulative patching** (DESIGN.md §3 conventions): the first ``n`` directions of an order
  patched together, for ``n`` on a grid, in both modes; the order is either the directions'
  |attribution| to the metric (:func:`~tl_degen.patching.attribution_patch`, in the same mode)
  or the basis' own column order (Λ for LIB, variance for PCA, index for neurons). Each
  curve point is one patch (a batched forward pass), not one per direction;
- the **fraction of the effect** restored: ``(m(n) − m_base) / (m_site − m_base)``, where
  ``m_base`` is the unpatched run and ``m_site`` the run with the whole site patched
  (TransformerLens-style), means over prompt pairs. It is ``1`` at ``n = k`` for a complete
  basis (neurons); a LIB or PCA basis with dropped directions reaches
  ``(m_all − m_base) / (m_site − m_base)``;
- the **number of directions needed** for 50 / 90 / 99 % of the effect: the smallest grid
  point whose fraction reaches it (``None`` if none does), with a percentile bootstrap
  interval over prompt pairs (pairs resampled with replacement, every curve point from the
  same resample; the attribution order is ranked once on all pairs and held fixed, so the
  interval leaves out the uncertainty of the ranking itself);
- **node ablation** (:func:`~tl_degen.ablation.ablation_curve`: all but the top ``n`` in the
  basis' order mean-ablated, on the clean prompts);
- **edge sparsity** of the graphs given: edges holding 90 / 99 % of each layer pair's edge mass
  and, with ``edge_tolerance``, the fewest edges keeping the metric within it
  (:func:`~tl_degen.ablation.edge_ablation`).

A basis that is a relabelling (permutation) of another gives identical attribution-ordered
curves: the order follows the directions, not their labels.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen import checks
from tl_degen.ablation import AblationCurve, ablation_curve, edge_ablation, make_metric
from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.errors import BasisMismatchError, DataError, SiteError, TLDegenError
from tl_degen.io import Serialisable, as_tensor
from tl_degen.model_state import prepared
from tl_degen.patching.attribution import direction_attributions, metric_gradient
from tl_degen.patching.common import _check_mode, _pair_tokens, lookup_basis
from tl_degen.patching.directions import patch_runs, read_pair
from tl_degen.sites import Site

__all__ = ["compare_bases", "BasisComparison", "PatchCurve", "Needed", "default_grid",
           "needed_directions", "edge_mass_counts"]

FRACTIONS = (0.5, 0.9, 0.99)
ORDERS = ("attribution", "basis")
METHODS = ("lib", "pca", "neuron")


# ---------------------------------------------------------------------------- plain math
def default_grid(k: int, points: int = 16) -> list[int]:
    """About ``points`` numbers of directions from 1 to ``k``, evenly spaced in log ``n``
    (every ``n`` when ``k ≤ points``), ``k`` last: the x axis of a curve."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TLDegenError(f"a basis needs at least one direction, got k={k!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise TLDegenError(f"points must be an integer of at least 2, got {points!r}")
    if k <= points:
        return list(range(1, k + 1))
    return sorted({max(1, round(k ** (i / (points - 1)))) for i in range(points)} | {k})


def fraction_of_effect(per_example: Float[Tensor, "n_points batch"], base: Float[Tensor, " batch"],
                       full: Float[Tensor, " batch"],
                       weights: Float[Tensor, "n_boot batch"] | None = None,
                       ) -> Float[Tensor, "... n_points"]:
    """``(m(n) − m_base) / (m_site − m_base)`` of means over prompt pairs; with ``weights``
    (resample counts per pair) one curve per row of weights."""
    if weights is None:
        weights = torch.ones(1, base.shape[0], dtype=torch.float64)
    weights = weights.double()
    w = weights / weights.sum(1, keepdim=True)
    m = w @ per_example.double().T  # [n_boot, n_points]
    b, f = w @ base.double(), w @ full.double()  # [n_boot]
    return (m - b[:, None]) / (f - b)[:, None]


def _bootstrap_arguments(n_bootstrap, seed, level) -> tuple[int, int, float]:
    """``n_bootstrap`` (at least 10), ``seed`` and ``level`` (in (0, 1)), checked."""
    return (checks.integer("n_bootstrap", n_bootstrap, minimum=10),
            checks.integer("seed", seed, minimum=0, maximum=2**63 - 1),
            checks.number("level", level, above=0, below=1))


def needed_directions(fractions: Float[Tensor, "... n_points"], n: Sequence[int],
                      target: float) -> Float[Tensor, "..."]:
    """The smallest ``n`` whose fraction reaches ``target``, per row (``inf`` where none)."""
    grid = torch.tensor([float(v) for v in n], dtype=torch.float64)
    hit = fractions >= target - 1e-9  # a complete basis reaches 1 up to rounding
    first = torch.where(hit, grid.expand_as(fractions), torch.full_like(fractions, math.inf))
    return first.min(-1).values


def bootstrap_weights(batch: int, n_bootstrap: int, seed: int) -> Float[Tensor, "n_boot batch"]:
    """Resample counts of ``batch`` pairs drawn with replacement, one row per resample."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(batch, (n_bootstrap, batch), generator=g)
    return torch.zeros(n_bootstrap, batch, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_bootstrap, batch, dtype=torch.float64))


def edge_mass_counts(edges: Float[Tensor, "d_out d_in"], fractions: Sequence[float] = (0.9, 0.99)
                     ) -> dict[float, int]:
    """How many of the strongest edges hold each fraction of the total edge mass."""
    if not torch.isfinite(edges).all():
        raise DataError("the edges hold NaN or Inf; refit the graph")
    vals = edges.double().flatten().abs().sort(descending=True).values
    total = float(vals.sum())
    if total <= 0:
        return {f: 0 for f in fractions}
    cum = vals.cumsum(0) / total
    return {f: min(int((cum < f - 1e-12).sum()) + 1, len(vals)) for f in fractions}


class Needed(NamedTuple):
    """Directions needed for a fraction of the effect: the full-data value and a bootstrap
    interval (``None`` where the curve never reaches the fraction)."""

    n: int | None
    low: int | None
    high: int | None

    def __str__(self) -> str:
        def fmt(v):
            return ">k" if v is None else str(v)
        return f"{fmt(self.n)} [{fmt(self.low)}, {fmt(self.high)}]"


def _as_int(v: float) -> int | None:
    return None if math.isinf(v) else int(v)


# ---------------------------------------------------------------------------- curves
@dataclass
class PatchCurve:
    """One cumulative patching curve: the first ``n[i]`` directions of ``order`` patched.

    Attributes:
        n: ``[n_points]`` numbers of directions (the grid).
        order: the direction order (indices into the basis' columns), first patched first.
        per_example: ``[n_points, batch]`` the metric per prompt pair at each point.
        base: ``[batch]`` the unpatched run's metric (corrupted when denoising, clean when
            noising).
        full: ``[batch]`` the metric with the whole site patched.
    """

    n: list[int]
    order: list[int]
    per_example: Float[Tensor, "n_points batch"]
    base: Float[Tensor, " batch"]
    full: Float[Tensor, " batch"]

    def fraction(self) -> Float[Tensor, " n_points"]:
        """Fraction of the whole-site effect at each point (module docstring)."""
        return fraction_of_effect(self.per_example, self.base, self.full)[0]

    def band(self, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
             ) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap band of :meth:`fraction`: ``(low, high)``, ``[n_points]``."""
        n_bootstrap, seed, level = _bootstrap_arguments(n_bootstrap, seed, level)
        fr = fraction_of_effect(self.per_example, self.base, self.full,
                                bootstrap_weights(self.base.shape[0], n_bootstrap, seed))
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        lo, hi = torch.nanquantile(fr, q, dim=0)
        return lo, hi

    def needed(self, target: float, n_bootstrap: int = 1000, seed: int = 0,
               level: float = 0.95) -> Needed:
        """Directions needed for ``target`` of the effect, with a bootstrap interval."""
        n_bootstrap, seed, level = _bootstrap_arguments(n_bootstrap, seed, level)
        target = checks.number("target", target, above=0, maximum=1)
        point = float(needed_directions(self.fraction(), self.n, target))
        boot = needed_directions(
            fraction_of_effect(self.per_example, self.base, self.full,
                               bootstrap_weights(self.base.shape[0], n_bootstrap, seed)),
            self.n, target)
        # order statistics of the resamples (inf, never reached, sorts last)
        s = boot.sort().values
        lo = s[int(math.floor((1 - level) / 2 * (len(s) - 1)))]
        hi = s[int(math.ceil((1 + level) / 2 * (len(s) - 1)))]
        return Needed(_as_int(point), _as_int(float(lo)), _as_int(float(hi)))

    def to_dict(self) -> dict:
        return {"n": list(self.n), "order": list(self.order), "per_example": self.per_example,
                "base": self.base, "full": self.full}

    @classmethod
    def from_dict(cls, d: dict) -> PatchCurve:
        return cls([int(v) for v in d["n"]], [int(v) for v in d["order"]],
                   as_tensor(d["per_example"]), as_tensor(d["base"]), as_tensor(d["full"]))


# ---------------------------------------------------------------------------- result
@dataclass
class BasisComparison(Serialisable):
    """Compactness of several bases on one task (module docstring for the definitions).

    Attributes:
        sites: site names, in forward order.
        bases: basis names (``"lib"``, ``"pca"``, ``"neuron"`` or the user's), in order.
        k: ``site → basis → `` number of kept directions.
        patching: ``site → basis → "mode/order" →`` :class:`PatchCurve`, e.g.
            ``patching["resid_mid.0:last"]["lib"]["denoising/attribution"]``.
        ablation: ``site → basis →`` :class:`~tl_degen.ablation.AblationCurve` (may be empty).
        edges: ``basis → "in->out" → {"n_edges", "mass_90", "mass_99", "required"}`` for the
            graphs given (``required``: fewest edges within ``edge_tolerance``, or ``None``).
        clean, corrupted: the unpatched runs' mean metric.
        config: ``n_pairs``, ``fractions``, ``n_bootstrap``, ``seed``, ``edge_tolerance``.

    ``to_dict()`` gives the constructor's arguments (curves as their dicts); ``from_dict`` /
    ``save`` / ``load`` round-trip it (:class:`tl_degen.io.Serialisable`).

    Examples:
        >>> cmp = tl_degen.compare_bases(model, clean, corrupted, logit_diff,
        ...                              ["resid_mid.0:last"])
        >>> print(cmp)  # directions needed for 50 / 90 / 99 %, with bootstrap intervals
        >>> cmp.needed("resid_mid.0:last", "lib", 0.9)
        >>> cmp.plot("resid_mid.0:last").save("compare.png")
    """

    sites: list[str]
    bases: list[str]
    k: dict[str, dict[str, int]]
    patching: dict[str, dict[str, dict[str, PatchCurve]]]
    ablation: dict[str, dict[str, AblationCurve]] = field(default_factory=dict)
    edges: dict[str, dict[str, dict]] = field(default_factory=dict)
    clean: float = math.nan
    corrupted: float = math.nan
    config: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- reading
    def _default(self, mode: str | None, order: str | None) -> tuple[str, str]:
        """The first mode and order this comparison ran, where not given."""
        return (mode or self.config.get("modes", ["denoising"])[0],
                order or self.config.get("orders", ["attribution"])[0])

    def curve(self, site: str | Site, basis: str, mode: str | None = None,
              order: str | None = None) -> PatchCurve:
        """One cumulative patching curve (default: the first mode and order run, normally
        denoising by attribution)."""
        mode, order = self._default(mode, order)
        name = Site.parse(site).name
        if name not in self.patching:
            raise SiteError(f"no site {name!r} in this comparison (sites: {self.sites})")
        if basis not in self.patching[name]:
            raise TLDegenError(f"no basis {basis!r} in this comparison (bases: {self.bases})")
        key = f"{mode}/{order}"
        if key not in self.patching[name][basis]:
            raise TLDegenError(f"no {key!r} curve; this comparison has "
                               f"{sorted(self.patching[name][basis])}")
        return self.patching[name][basis][key]

    def needed(self, site: str | Site, basis: str, fraction: float, mode: str | None = None,
               order: str | None = None) -> Needed:
        """Directions needed for ``fraction`` of the effect, with the bootstrap interval."""
        return self.curve(site, basis, mode, order).needed(
            fraction, self.config.get("n_bootstrap", 1000), self.config.get("seed", 0),
            self.config.get("level", 0.95))

    def table(self, mode: str | None = None, order: str | None = None) -> str:
        """A text table: per site and basis, ``k`` and the directions needed for each
        fraction (full-data value [bootstrap interval]); edge counts below when present."""
        mode, order = self._default(mode, order)
        fractions = self.config.get("fractions", list(FRACTIONS))
        heads = [f"{f:.0%}" for f in fractions]
        rows = []
        for site in self.sites:
            for b in self.bases:
                if b not in self.patching.get(site, {}):
                    continue
                c = self.curve(site, b, mode, order)
                rows.append([site, b, str(self.k[site][b])]
                            + [str(self.needed(site, b, f, mode, order)) for f in fractions]
                            + [f"{float(c.fraction()[-1]):.3f}"])
        cols = ["site", "basis", "k"] + heads + ["at k"]
        widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        for b, pairs in self.edges.items():
            for pair, e in pairs.items():
                req = "" if e.get("required") is None else f", {e['required']} within tolerance"
                lines.append(f"edges {b} {pair}: {e['n_edges']} edges, 90% of mass in "
                             f"{e['mass_90']}, 99% in {e['mass_99']}{req}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        cfg = self.config
        mode, order = self._default(None, None)
        return (f"BasisComparison({len(self.sites)} sites × {len(self.bases)} bases, "
                f"{cfg.get('n_pairs', '?')} pairs, clean={self.clean:.5g}, "
                f"corrupted={self.corrupted:.5g})\n  directions needed for a fraction of the "
                f"whole-site effect ({mode}, {order} order; "
                f"{cfg.get('level', 0.95):.0%} bootstrap interval):\n  "
                + self.table().replace("\n", "\n  "))

    # ---------------------------------------------------------------- plots
    def plot(self, site: str | Site, mode: str | None = None, order: str | None = None,
             *, kind: str = "patching"):
        """Curves per basis at ``site`` with bootstrap bands, log-x (a
        :class:`~tl_degen.viz.plots.Plot`: ``.figure()`` is a matplotlib figure,
        ``.save("x.png")``). ``kind="ablation"`` draws the node-ablation curves instead."""
        from tl_degen.viz.plots import Plot, Series

        name = Site.parse(site).name
        if kind == "ablation":
            curves = self.ablation.get(name, {})
            if not curves:
                raise TLDegenError(f"no node-ablation curves at {name!r} in this comparison")
            plot = Plot(f"Node ablation at {name}", "directions kept (basis order)", "metric",
                        logx=True)
            for b, c in curves.items():
                pts = sorted((n, v) for n, v in zip(c.n_kept, c.values) if n > 0)
                plot.series.append(Series(f"{b} (k={self.k[name][b]})", [p[0] for p in pts],
                                          [p[1] for p in pts]))
            return plot
        if kind != "patching":
            raise TLDegenError(f"kind must be 'patching' or 'ablation', got {kind!r}")
        mode, order = self._default(mode, order)
        plot = Plot(f"Cumulative {mode} at {name} ({order} order)", "directions patched",
                    "fraction of the whole-site effect", logx=True)
        cfg = self.config
        for b in self.bases:
            if b not in self.patching.get(name, {}):
                continue
            c = self.curve(name, b, mode, order)
            lo, hi = c.band(cfg.get("n_bootstrap", 1000), cfg.get("seed", 0),
                            cfg.get("level", 0.95))
            plot.series.append(Series(f"{b} (k={self.k[name][b]})", [float(v) for v in c.n],
                                      c.fraction().tolist(), lower=lo.tolist(),
                                      upper=hi.tolist()))
        return plot

    def figure(self, mode: str | None = None, order: str | None = None):
        """Every site in one matplotlib figure: a row per site, cumulative patching (with
        bootstrap bands) beside node ablation when it was run."""
        from matplotlib.figure import Figure

        cols = 2 if self.ablation else 1
        fig = Figure(figsize=(6.2 * cols, 3.4 * len(self.sites)), dpi=100)
        axes = fig.subplots(len(self.sites), cols, squeeze=False)
        for r, site in enumerate(self.sites):
            self.plot(site, mode, order).draw(axes[r][0])
            if cols == 2 and self.ablation.get(site):
                self.plot(site, kind="ablation").draw(axes[r][1])
            elif cols == 2:
                axes[r][1].set_visible(False)
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------- saving
    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"sites": list(self.sites), "bases": list(self.bases),
                "k": {s: dict(v) for s, v in self.k.items()},
                "patching": {s: {b: {key: c.to_dict() for key, c in curves.items()}
                                 for b, curves in per.items()}
                             for s, per in self.patching.items()},
                "ablation": {s: {b: c.to_dict() for b, c in per.items()}
                             for s, per in self.ablation.items()},
                "edges": {b: {p: dict(e) for p, e in pairs.items()}
                          for b, pairs in self.edges.items()},
                "clean": self.clean, "corrupted": self.corrupted, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> BasisComparison:
        return cls(list(d["sites"]), list(d["bases"]),
                   {s: {b: int(v) for b, v in per.items()} for s, per in d["k"].items()},
                   {s: {b: {key: PatchCurve.from_dict(c) for key, c in curves.items()}
                        for b, curves in per.items()} for s, per in d["patching"].items()},
                   {s: {b: AblationCurve.from_dict(c) for b, c in per.items()}
                    for s, per in d.get("ablation", {}).items()},
                   {b: {p: dict(e) for p, e in pairs.items()}
                    for b, pairs in d.get("edges", {}).items()},
                   d.get("clean", math.nan), d.get("corrupted", math.nan),
                   dict(d.get("config") or {}))

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable); :meth:`from_dict` reads it too."""

        def plain(v):
            if isinstance(v, Tensor):
                return v.tolist()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        return plain(self.to_dict())


# ---------------------------------------------------------------------------- the verb
def _basis_sets(model, bases, sites: list[Site]) -> dict[str, dict[Site, InteractionBasis]]:
    """``name → site → basis``, every site present and checked against the model."""
    if not isinstance(bases, Mapping) or not bases:
        raise TLDegenError("bases must be a dict of name → BasisSet (or InteractionBasis), "
                           "e.g. {'lib': lib_bases, 'pca': pca_bases}")
    out: dict[str, dict[Site, InteractionBasis]] = {}
    for name, b in bases.items():
        if not isinstance(name, str) or not name:
            raise TLDegenError(f"basis names must be non-empty strings, got {name!r}")
        if isinstance(b, InteractionBasis):
            if b.site not in sites:
                raise BasisMismatchError(
                    f"basis {name!r} is of site {b.site.name!r}, not one of the sites compared "
                    f"{[s.name for s in sites]}")
            out[name] = {b.site: lookup_basis(b, b.site, model)}
            continue
        if not isinstance(b, BasisSet):
            raise TLDegenError(f"basis {name!r} must be a BasisSet or an InteractionBasis, got "
                               f"{type(b).__name__}")
        missing = [s.name for s in sites if s not in b]
        if missing:
            raise BasisMismatchError(
                f"basis {name!r} has no basis at {missing} (it has {[s.name for s in b.sites]}); "
                "fit it at the compared sites, or compare only the sites it has")
        try:
            b.check_model(model)
        except BasisMismatchError as err:
            raise BasisMismatchError(f"basis {name!r}: {err}") from None
        out[name] = {s: b[s] for s in sites}
    return out


def _check_graphs(model, graphs) -> None:
    """``None``, ``True`` or ``name → InteractionGraph`` of this model."""
    from tl_degen.graph import InteractionGraph

    if graphs is None or graphs is True:
        return
    if not isinstance(graphs, Mapping):
        raise TLDegenError("graphs must be a dict of name → InteractionGraph, or True")
    for name, g in graphs.items():
        if not isinstance(g, InteractionGraph):
            raise TLDegenError(f"graphs[{name!r}] must be an InteractionGraph, got "
                               f"{type(g).__name__}")
        try:
            g.bases.check_model(model)
        except BasisMismatchError as err:
            raise BasisMismatchError(f"graph {name!r}: {err}") from None


def _metrics(metric, labels, position, n: int) -> tuple[Callable, Callable]:
    """The per-example metric and the differentiable one attribution orders by."""
    if isinstance(metric, str):
        if labels is None:
            raise TLDegenError(f"metric {metric!r} needs labels=[batch] target token ids")
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise DataError(f"labels must be a [{n}] integer tensor (one target per clean "
                            f"prompt), got {getattr(labels, 'shape', type(labels).__name__)}")
    elif callable(metric):
        user = metric

        def metric(logits: Tensor) -> Tensor:
            value = user(logits)
            if isinstance(value, Tensor) and value.dim() == 0:
                raise DataError("compare_bases needs the metric per prompt pair ([batch]), not "
                                "a scalar: its bootstrap resamples pairs")
            return value
    fn = make_metric(metric, labels, position)
    value = lambda logits: fn(logits, slice(None))  # noqa: E731
    if metric == "accuracy":  # not differentiable: attribution orders by the loss
        loss = make_metric("loss", labels, position)
        return value, lambda logits: -loss(logits, slice(None))
    return value, value


def compare_bases(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"] | None,
    metric: str | Callable[[Tensor], Tensor],
    sites: str | Site | Sequence[str | Site],
    *,
    bases: Mapping[str, BasisSet | InteractionBasis] | None = None,
    labels: Int[Tensor, " batch"] | None = None,
    position: int = -1,
    n: Sequence[int] | None = None,
    modes: Sequence[str] = ("denoising", "noising"),
    orders: Sequence[str] = ORDERS,
    ablation: bool = True,
    graphs: Mapping[str, object] | bool | None = None,
    edge_tolerance: float | None = None,
    fractions: Sequence[float] = FRACTIONS,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    fit_kwargs: dict | None = None,
    rows_per_pass: int = 4096,
    progress: bool = True,
) -> BasisComparison:
    """Compare bases on one task: cumulative patching, node ablation and edge sparsity
    (module docstring for the definitions).

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` prompt pairs. ``corrupted_tokens=None``
            with one dataset: each prompt is paired with the next one (resample patching),
            which suits a metric with ``labels``.
        metric: a function of the logits ``[batch, pos, vocab]`` → ``[batch]`` or a scalar
            (e.g. a logit difference), or ``"accuracy"`` / ``"loss"`` with ``labels`` (the
            clean prompts' targets, read at ``position``). Attribution orders by the metric
            itself, or by the loss when the metric is accuracy.
        sites: the sites to compare (not the logits).
        bases: ``name → BasisSet`` (or a single-site ``InteractionBasis``, e.g. one built
            from an SAE's decoder); default: LIB, PCA and neuron bases fitted here on the
            clean and corrupted prompts (``fit_kwargs`` go to :func:`~tl_degen.fit_bases`).
        n: numbers of directions per curve (default :func:`default_grid` of each basis'
            ``k``; points above ``k`` are dropped and ``k`` is always last).
        modes, orders: which curves (``"denoising"``/``"noising"``;
            ``"attribution"``/``"basis"``).
        ablation: also run node-ablation curves (basis order, on the clean prompts).
        graphs: ``name → InteractionGraph`` of the same bases, for edge sparsity, or
            ``True`` to fit one per basis set here (:func:`~tl_degen.interaction_graph` on
            the clean and corrupted prompts; edges between consecutive sites of each set).
        edge_tolerance: also bisect for the fewest edges per layer pair within this
            tolerance of the unablated metric (:func:`~tl_degen.edge_ablation`).
        fractions, n_bootstrap, level, seed: the fractions of the effect to count
            directions for, and the percentile bootstrap over prompt pairs.
        dtype: the model's dtype while patching (default: its own).
        rows_per_pass: token rows per stacked forward pass (memory).

    Returns:
        A :class:`BasisComparison`.

    Examples:
        >>> clean, corrupted, logit_diff = modadd.patching_pairs(300)
        >>> cmp = tl_degen.compare_bases(model, clean, corrupted, logit_diff,
        ...                              ["resid_mid.0:last", "mlp_post.0:last"])
        >>> print(cmp)
        >>> cmp.figure().savefig("compare.png")
    """
    from tl_degen.fitting import fit_bases

    adapter = get_adapter(model)
    if isinstance(sites, (str, Site)):
        sites = [sites]
    site_list = [Site.parse(s) for s in sites]
    if not site_list:
        raise SiteError("give at least one site to compare")
    if any(s.kind == "logits" for s in site_list):
        raise SiteError("the logits are the output itself; compare bases at earlier sites")
    if len(set(site_list)) != len(site_list):
        raise SiteError(f"sites repeat: {[s.name for s in site_list]}")
    for s in site_list:
        adapter.check_site(s)
    if corrupted_tokens is None:
        if not isinstance(clean_tokens, Tensor) or clean_tokens.dim() != 2 or len(
                clean_tokens) < 2:
            raise DataError("with corrupted_tokens=None give clean_tokens as one [batch, pos] "
                            "tensor of at least 2 prompts (each is paired with the next)")
        corrupted_tokens = clean_tokens.roll(-1, 0)
    clean, corrupted = _pair_tokens(adapter, clean_tokens, corrupted_tokens)
    for m in modes:
        _check_mode(m)
    if not modes:
        raise TLDegenError("give at least one mode")
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise TLDegenError(f"orders must be among {ORDERS}, got {list(orders)}")
    seed = checks.integer("seed", seed, minimum=0, maximum=2**63 - 1)
    if fit_kwargs is not None and not isinstance(fit_kwargs, Mapping):
        raise TLDegenError(f"fit_kwargs must be a dict of fit_bases arguments, got "
                           f"{type(fit_kwargs).__name__}")
    unknown = set(fit_kwargs or {}) - set(inspect.signature(fit_bases).parameters)
    if unknown:
        raise TLDegenError(f"fit_kwargs has {sorted(unknown)}, which fit_bases does not take")
    if isinstance(metric, str) and labels is not None:
        labels = checks.labels(labels, clean.shape[0], adapter.d_vocab)
    if isinstance(position, bool) or not isinstance(position, int) or not (
            -clean.shape[1] <= position < clean.shape[1]):
        raise TLDegenError(f"position {position!r} is outside prompts of {clean.shape[1]} "
                           "tokens; give an integer index such as -1 (the last)")
    if not fractions:
        raise TLDegenError("fractions is empty; give fractions in (0, 1], e.g. [0.9]")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise TLDegenError(f"fractions must be numbers in (0, 1], got {f!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 10:
        raise TLDegenError(f"n_bootstrap must be an integer of at least 10, got {n_bootstrap!r}")
    if not isinstance(level, float) or not 0 < level < 1:
        raise TLDegenError(f"level must be a float in (0, 1), got {level!r}")
    if n is not None:
        if not n or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in n):
            raise TLDegenError(f"n must be positive integers, got {list(n)}")
        grid = sorted(set(n))
    if isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int) or rows_per_pass < 1:
        raise TLDegenError(f"rows_per_pass must be a positive integer, got {rows_per_pass!r}")
    if labels is not None and not isinstance(metric, str):
        raise TLDegenError("labels go with metric='accuracy' or 'loss'; a metric function "
                           "reads its own answers")
    value_fn, order_fn = _metrics(metric, labels, position, clean.shape[0])
    _check_graphs(model, graphs)
    if edge_tolerance is not None and (
            isinstance(edge_tolerance, bool) or not isinstance(edge_tolerance, (int, float))
            or not math.isfinite(edge_tolerance) or edge_tolerance <= 0):
        raise TLDegenError(f"edge_tolerance must be a positive finite number, got "
                           f"{edge_tolerance!r}")
    if edge_tolerance is not None and not graphs:
        raise TLDegenError("edge_tolerance needs graphs (a dict of InteractionGraphs, or True)")

    if bases is None:
        both = torch.cat([clean, corrupted])
        bases = {m: fit_bases(model, both, site_list, method=m, progress=progress,
                              **(fit_kwargs or {})) for m in METHODS}
    per_basis = _basis_sets(model, bases, site_list)
    names = list(per_basis)

    k = {s.name: {b: per_basis[b][s].k for b in names if s in per_basis[b]} for s in site_list}
    grids = {(s, b): ([v for v in grid if v < k[s.name][b]] + [k[s.name][b]] if n is not None
                      else default_grid(k[s.name][b])) for s in site_list for b in names
             if s in per_basis[b]}
    steps = [(s, m, b) for s in site_list for m in modes for b in names if s in per_basis[b]]
    patching: dict = {s.name: {} for s in site_list}
    bar = tqdm(total=len(steps) + (len(grids) if ablation else 0),
               desc="comparing bases", disable=not progress)
    with prepared(model, dtype), torch.no_grad():
        # the clean and corrupted runs, and the site activations, are the same for every
        # basis and mode: one pass each, every site read at once
        reads = read_pair(adapter, clean, corrupted, site_list, value_fn)
    clean_value, corrupted_value = float(reads.clean.mean()), float(reads.corrupted.mean())
    gap = abs(clean_value - corrupted_value)
    grads: dict = {}
    for s, mode, b in steps:
        basis = per_basis[b][s]
        x_s, x_t = reads.x_clean[s], reads.x_corrupted[s]
        base = reads.corrupted if mode == "denoising" else reads.clean
        if mode == "noising":
            x_s, x_t = x_t, x_s
        orders_of = {}
        if "attribution" in orders:
            # attribution patching (the gradient method) in every basis from one gradient
            # per site and mode: Δx̂ · ĝ with Δx̂ = Δx C, ĝ = g C⁺ᵀ
            if (s, mode) not in grads:
                target = corrupted if mode == "denoising" else clean
                with prepared(model, dtype):  # steps run site by site: keep only this one
                    grads = {(s, mode): metric_gradient(adapter, target, order_fn, s, x_t)}
            diff = (x_s - x_t).double()
            diff[..., -1] = 0.0
            per_direction = direction_attributions(diff, grads[(s, mode)], basis)[0].sum(0)
            orders_of["attribution"] = per_direction.abs().argsort(
                descending=True, stable=True).tolist()
        if "basis" in orders:
            orders_of["basis"] = list(range(basis.k))
        groups, index = [], {}
        for order in orders_of.values():
            for v in grids[(s, b)]:
                key = tuple(sorted(order[:v]))
                if key not in index:
                    index[key] = len(groups)
                    groups.append(list(order[:v]))
        runs = patch_runs(model, clean, corrupted, basis, value_fn, groups,
                          list(range(len(s.resolve_positions(clean.shape[1])))), mode=mode,
                          dtype=dtype, rows_per_pass=rows_per_pass, progress=False,
                          with_all=False,  # every kept direction is the curve's last point
                          reads=reads)
        if runs.moved == 0 or abs(float(runs.site.mean() - base.mean())) <= 1e-9 * max(gap, 1.0):
            raise DataError(f"patching the whole of {s.name} does not change the metric "
                            f"({mode}); the task does not go through this site, or clean and "
                            "corrupted prompts agree there")
        for oname, order in orders_of.items():
            rows = [index[tuple(sorted(order[:v]))] for v in grids[(s, b)]]
            patching[s.name].setdefault(b, {})[f"{mode}/{oname}"] = PatchCurve(
                list(grids[(s, b)]), order, runs.groups[rows], base.cpu(), runs.site)
        bar.update(1)

    curves: dict = {}
    if ablation:
        for s in site_list:
            for b in names:
                if s not in per_basis[b]:
                    continue
                bset = bases[b] if isinstance(bases[b], BasisSet) else BasisSet([bases[b]])
                curves.setdefault(s.name, {})[b] = ablation_curve(
                    model, clean, bset, s, value_fn, n_kept=[0] + grids[(s, b)],
                    batch_size=clean.shape[0], dtype=dtype, progress=False)
                bar.update(1)
    bar.close()

    if graphs is True:
        from tl_degen.graph import interaction_graph

        both = torch.cat([clean, corrupted])
        graph_kwargs = {k: v for k, v in (fit_kwargs or {}).items()
                        if k in ("n_probes", "batch_size", "dtype")}
        graphs = {b: interaction_graph(model, both, bases[b], progress=progress, **graph_kwargs)
                  for b in names if isinstance(bases[b], BasisSet) and len(bases[b].sites) > 1}
    edges: dict = {}
    for b, g in (graphs or {}).items():
        required = {}
        if edge_tolerance is not None:
            required = edge_ablation(model, clean, g, value_fn, tolerance=edge_tolerance,
                                     batch_size=clean.shape[0], dtype=dtype,
                                     progress=progress).n_edges_required
        for a, o in g.pairs():
            pair = f"{a.name}->{o.name}"
            mass = edge_mass_counts(g.edges[(a, o)], (0.9, 0.99))
            edges.setdefault(b, {})[pair] = {"n_edges": int(g.edges[(a, o)].numel()),
                                             "mass_90": mass[0.9], "mass_99": mass[0.99],
                                             "required": required.get(pair)}

    config = {"n_pairs": int(clean.shape[0]), "fractions": [float(f) for f in fractions],
              "n_bootstrap": n_bootstrap, "level": level, "seed": seed,
              "edge_tolerance": edge_tolerance, "modes": list(modes), "orders": list(orders)}
    return BasisComparison([s.name for s in site_list], names, k, patching, curves, edges,
                           clean_value, corrupted_value, config)
