"""Node-ablation curves: keep the top-n directions of a site's basis, mean-ablate the rest.

For a basis with coordinates ``x̂ = x C``, keeping ``n`` directions replaces the site vector
by ``(x̂ ⊙ m + μ̂ ⊙ (1 − m)) C⁺`` with ``m`` the first ``n`` columns (constant first, then by
descending eigenvalue) and ``μ̂ = μ C`` the coordinates' mean on the data the basis was fitted
on. The rest of the network runs unchanged. Works for LIB, PCA and neuron bases alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen import checks
from tl_degen.adapters import get_adapter
from tl_degen.basis_set import BasisSet
from tl_degen.distributed import Shards, tensors_digest, weights_digest
from tl_degen.errors import ArgumentError, DataError, TLDegenError
from tl_degen.fitting import check_positions, token_batches
from tl_degen.io import Serialisable
from tl_degen.model_state import prepared
from tl_degen.sections.attention import AttentionFormula
from tl_degen.sections.base import Section
from tl_degen.sections.mlp import LinearSection
from tl_degen.sections.plan import SectionPlan
from tl_degen.sites import Site

__all__ = ["ablation_curve", "AblationCurve", "edge_ablation", "EdgeAblationResult", "make_metric"]

Metric = Callable[[Tensor], Tensor]


def make_metric(metric: str | Metric, labels: Tensor | None = None, position: int = -1,
                ) -> Callable[[Tensor, slice], Tensor]:
    """A metric of ``(logits [batch, pos, vocab], rows)`` returning per-example values.

    ``"accuracy"``: argmax at ``position`` equals ``labels``. ``"loss"``: cross-entropy at
    ``position``. A callable gets the logits and returns a scalar or per-example values.
    """
    if isinstance(metric, str):
        if metric not in ("accuracy", "loss"):
            raise TLDegenError(f"unknown metric {metric!r}; use 'accuracy', 'loss' or a "
                               "function of the logits")
        if labels is None:
            raise TLDegenError(f"metric {metric!r} needs labels=[batch] token ids")

        def fn(logits: Tensor, rows: slice) -> Tensor:
            lg = logits[:, position].double()
            y = labels[rows].to(lg.device)
            if metric == "accuracy":
                return (lg.argmax(-1) == y).double()
            return torch.nn.functional.cross_entropy(lg, y, reduction="none")

        return fn
    if not callable(metric):
        raise TLDegenError("metric must be 'accuracy', 'loss' or a function of the logits")

    def user(logits: Tensor, rows: slice) -> Tensor:
        try:
            value = metric(logits)
        except (IndexError, RuntimeError) as exc:
            raise DataError(
                f"the metric failed on logits of shape {tuple(logits.shape)} "
                f"({type(exc).__name__}: {exc}); a metric that closes over per-example answers "
                "must be built for exactly these prompts, in this order") from exc
        if not isinstance(value, Tensor) or value.dim() > 1 or (
                value.dim() == 1 and value.shape[0] != logits.shape[0]):
            raise TLDegenError("the metric must return a scalar tensor or one value per "
                               f"example ([{logits.shape[0]}]), got "
                               f"{getattr(value, 'shape', type(value))}")
        if not bool(torch.isfinite(value).all()):
            raise DataError("the metric returned NaN or Inf; a curve of it would be "
                            "meaningless. Check it on the model's logits (e.g. a log of 0)")
        return value.double().expand(logits.shape[0]) if value.dim() == 0 else value.double()

    return user


@dataclass
class AblationCurve(Serialisable):
    """The metric with only the top-``n`` directions of ``site`` kept, for each ``n``.

    ``to_dict()`` gives the constructor's arguments, ``{"site": name, "method", "n_kept":
    [...], "values": [...], "baseline", "config": {...}}``; ``from_dict`` / ``save`` / ``load``
    round-trip it (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is the curve itself,
    ``{n: value}``.

    Examples:
        >>> labels = modadd.labels_for(modadd.train_test_split()[0])  # [batch]
        >>> curve = tl_degen.ablation_curve(model, tokens, bases, "resid_mid.0:last", "accuracy",
        ...                                 labels=labels, n_kept=[0, 10, 50])
        >>> curve.baseline, curve.as_dict()[10]
    """

    site: Site
    method: str
    n_kept: list[int]
    values: list[float]
    baseline: float  # the unablated model
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"site": self.site.name, "method": self.method, "n_kept": list(self.n_kept),
                "values": list(self.values), "baseline": self.baseline,
                "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> AblationCurve:
        checks.fields("AblationCurve.from_dict", d,
                      ("site", "method", "n_kept", "values", "baseline"))
        return cls(Site.parse(d["site"]), d["method"], list(d["n_kept"]), list(d["values"]),
                   d["baseline"], dict(d.get("config") or {}))

    def as_dict(self) -> dict[int, float]:
        """The curve: ``{n_kept: value}``."""
        return dict(zip(self.n_kept, self.values))

    def __repr__(self) -> str:
        pts = ", ".join(f"{n}: {v:.4f}" for n, v in list(zip(self.n_kept, self.values))[:6])
        return (f"AblationCurve({self.site.name!r}, method={self.method!r}, "
                f"baseline={self.baseline:.4f}, {len(self.n_kept)} points: {pts}"
                f"{', …' if len(self.n_kept) > 6 else ''})")


def _batched_metric(model, tokens, batch_size, labels, metric, position):
    """``(adapter, batches, n_local, fn)``: this process's batches, their number of sequences
    (checked against ``labels``) and the metric function."""
    adapter = get_adapter(model)
    position = checks.integer("position", position)
    batches = token_batches(tokens, batch_size, adapter)
    n_local = sum(b.shape[0] for b in batches)
    n_pos = min(b.shape[1] for b in batches)
    if not -n_pos <= position < n_pos:
        raise ArgumentError(f"position {position} is outside prompts of {n_pos} tokens")
    if labels is not None:
        labels = checks.labels(labels, n_local, adapter.d_vocab_out)
    if labels is not None and batches.order is not None:  # prompts regrouped by length
        labels = labels[batches.order.to(labels.device)]
    return adapter, batches, n_local, make_metric(metric, labels, position)


def ablation_curve(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    bases: BasisSet,
    site: str | Site,
    metric: str | Metric,
    *,
    n_kept: Sequence[int] | None = None,
    labels: Tensor | None = None,
    position: int = -1,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> AblationCurve:
    """Metric when only the top-``n`` basis directions of ``site`` are kept (rest mean-ablated).

    Args:
        model: the model the bases were fitted on (checked).
        tokens: evaluation tokens ``[batch, pos]`` (e.g. a held-out split).
        bases: LIB, PCA or neuron bases containing ``site``.
        metric: ``"accuracy"`` or ``"loss"`` (both need ``labels``, ``[batch]`` target ids,
            and read ``position``), or a function of the logits ``[batch, pos, vocab]``
            returning a scalar or ``[batch]``.
        n_kept: numbers of directions to keep (default: every ``n`` from ``k`` down to 0).
        dtype: dtype to run the model in (default: its own).
        distributed: inside a ``torch.distributed`` process group each rank passes its own
            shard of ``tokens`` (and ``labels``); the metric is summed over ranks and every
            rank returns the curve of all shards (:mod:`tl_degen.distributed`; ``False``
            opts out).

    Returns:
        An :class:`AblationCurve` with the metric (mean over examples) for each ``n``.

    Examples:
        >>> test = modadd.train_test_split()[1]
        >>> curve = tl_degen.ablation_curve(model, modadd.tokens_for(test), bases,
        ...                                 "resid_mid.0:last", "accuracy",
        ...                                 labels=modadd.labels_for(test))
    """
    shards = Shards(distributed)
    with shards.step("ablation_curve (checking the arguments)"):
        checks.instance("bases", bases, BasisSet, "fit_bases")
        bases.check_model(model)
        basis = bases[site]
        site = basis.site
        if site.kind == "logits":
            raise TLDegenError("ablating the logits is not supported; choose an earlier site")
        n_kept = (list(range(basis.k, -1, -1)) if n_kept is None
                  else checks.integers("n_kept", n_kept, minimum=0))
        adapter, batches, n_local, fn = _batched_metric(model, tokens, batch_size, labels,
                                                        metric, position)
        check_positions(site, batches)
        fingerprint = {"site": site.name, "n_kept": n_kept,
                       "position": position, "dtype": str(dtype),
                       "metric": metric if isinstance(metric, str) else "function"}
        if shards.active:
            fingerprint["weights"] = weights_digest(model)
            fingerprint["basis"] = tensors_digest([basis.C, basis.C_pinv, basis.mean])
    shards.agree("ablation_curve", fingerprint)
    C, C_pinv = basis.C.to(adapter.device), basis.C_pinv.to(adapter.device)
    mean_coords = basis.mean.to(adapter.device) @ C
    totals = {n: 0.0 for n in n_kept}
    baseline = 0.0
    with shards.step(f"ablation_curve ({site.name})"), prepared(model, dtype), torch.no_grad():
        offset = 0
        for b in tqdm(batches, desc=f"ablating {site.name}", disable=not progress):
            rows = slice(offset, offset + b.shape[0])
            offset += b.shape[0]
            (logits,) = adapter.read_sites(b, [Site("logits")])
            baseline += float(fn(logits, rows).sum())
            (x,) = adapter.read_sites(b, [site])
            coords = x.double() @ C
            for n in n_kept:
                kept = coords.clone()
                kept[..., min(n, basis.k):] = mean_coords[min(n, basis.k):]
                x_abl = (kept @ C_pinv).to(x.dtype)
                if site.has_constant:
                    x_abl[..., -1] = 1.0
                out = adapter.run(b, read=Site("logits"), write=(site, x_abl))
                totals[n] += float(fn(out, rows).sum())
    baseline, *sums = shards.sum_floats([baseline] + [totals[n] for n in n_kept])
    (n_total,) = shards.sum_ints([n_local])
    return AblationCurve(site, basis.method, n_kept, [v / n_total for v in sums],
                         baseline / n_total, config={"position": position,
                                                     "n_samples": n_total})


@dataclass
class EdgeAblationResult(Serialisable):
    """Metric with only the strongest ``k`` edges of each layer pair kept.

    Attributes:
        baseline: the metric of the unablated model.
        results: ``"in->out"`` → {number of edges kept (not counting the constant node's): metric}.
        n_edges_required: ``"in->out"`` → the fewest edges whose metric stays within
            ``tolerance`` of the baseline (bisection; only when a tolerance was given).
        tolerance: the tolerance of the bisection (``None``: no bisection).

    ``to_dict()`` gives the constructor's arguments, ``{"baseline", "results": {"in->out":
    {n_edges: value}}, "n_edges_required": {"in->out": n}, "tolerance"}``; ``from_dict`` /
    ``save`` / ``load`` round-trip it (:class:`tl_degen.io.Serialisable`; the numbers of
    edges, strings in JSON, come back as integers).

    Examples:
        >>> labels = modadd.labels_for(modadd.train_test_split()[0])
        >>> res = tl_degen.edge_ablation(model, tokens, graph, "accuracy", labels=labels,
        ...                              n_edges=[10, 100], tolerance=0.01)
        >>> res.results["resid_pre.0->resid_mid.0:last"][100], res.n_edges_required
    """

    baseline: float
    results: dict[str, dict[int, float]]
    n_edges_required: dict[str, int]
    tolerance: float | None

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"baseline": self.baseline,
                "results": {k: dict(v) for k, v in self.results.items()},
                "n_edges_required": dict(self.n_edges_required), "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, d: dict) -> EdgeAblationResult:
        checks.fields("EdgeAblationResult.from_dict", d,
                      ("baseline", "results", "n_edges_required"))
        return cls(d["baseline"],
                   {k: {int(n): v for n, v in r.items()} for k, r in d["results"].items()},
                   dict(d["n_edges_required"]), d.get("tolerance"))

    def __repr__(self) -> str:
        req = ", ".join(f"{k}: {v}" for k, v in self.n_edges_required.items())
        return (f"EdgeAblationResult(baseline={self.baseline:.4f}, tolerance={self.tolerance}, "
                f"n_edges_required={{{req}}})")


def edge_ablation(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    graph,
    metric: str | Metric,
    *,
    pairs: Sequence[tuple[str | Site, str | Site]] | None = None,
    n_edges: Sequence[int] | None = None,
    tolerance: float | None = None,
    upper: int | dict[str, int] | None = None,
    labels: Tensor | None = None,
    position: int = -1,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> EdgeAblationResult:
    """Run the model keeping only the strongest edges of one layer pair at a time.

    For a pair ``in → out`` with edge mask ``m`` (the ``k`` strongest edges, plus every edge
    out of the constant node), output direction ``i`` of the out-site is computed by running
    the section on the in-site coordinates with the directions ``j`` where ``m[i, j] = 0``
    set to zero; output directions sharing a mask share one run. The out-site vector is then
    rebuilt from those coordinates and the rest of the network runs unchanged (the reference
    implementation's edge ablation).

    Nothing is computed twice: the in-site is read once per pair; an output direction's
    coordinates depend only on how many of its edges are kept, so they are cached across
    probes; sections with a closed form (:mod:`tl_degen.sections`) are evaluated alone,
    at the positions read, and other sections run the model with many masks stacked along the
    batch (:data:`STACK_BUDGET` bytes at a time).

    Args:
        graph: an :class:`~tl_degen.graph.InteractionGraph` of this model.
        metric: as in :func:`ablation_curve` (``"accuracy"`` and ``"loss"`` need ``labels``,
            ``[batch]`` target ids).
        pairs: layer pairs to ablate (default: all of the graph's), one at a time.
        n_edges: numbers of edges to evaluate for each pair.
        tolerance: if given, bisect for the fewest edges whose metric is within ``tolerance``
            of the unablated value: ``lo = 0``, ``hi = upper``, probe ``ceil((lo + hi) / 2)``
            until ``hi − lo = 1``. The metric need not be monotone in the number of edges, so
            the answer depends on the probes; this is the reference implementation's schedule.
        upper: upper end of the bisection, per pair name ``"in->out"`` or for all (default:
            every edge). The reference implementation used ``d_out × d_in``, the site
            dimensions including the constant coordinate.
        distributed: inside a ``torch.distributed`` process group each rank passes its own
            shard of ``tokens`` (and ``labels``); every probe's metric is summed over ranks,
            so all ranks take the same bisection steps and return the same result
            (:mod:`tl_degen.distributed`; ``False`` opts out).

    Returns:
        An :class:`EdgeAblationResult`.

    Examples:
        >>> labels = modadd.labels_for(modadd.train_test_split()[0])
        >>> res = tl_degen.edge_ablation(model, tokens, graph, "accuracy", labels=labels,
        ...                              pairs=[("resid_mid.0:last", "resid_post.0:last")],
        ...                              tolerance=0.01)
    """
    shards = Shards(distributed)
    with shards.step("edge_ablation (checking the arguments)"):
        if n_edges is None and tolerance is None:
            raise TLDegenError("give n_edges=[...] to evaluate, or tolerance= to bisect, or both")
        if n_edges is not None:
            n_edges = checks.integers("n_edges", n_edges, minimum=0)
        tolerance = checks.number("tolerance", tolerance, minimum=0, none=True)
        if isinstance(upper, dict):
            upper = {str(k): checks.integer(f"upper[{k!r}]", v, minimum=0)
                     for k, v in upper.items()}
        else:
            upper = checks.integer("upper", upper, minimum=0, none=True)
        from tl_degen.graph import InteractionGraph

        checks.instance("graph", graph, InteractionGraph, "interaction_graph")
        graph.bases.check_model(model)
        adapter, batches, n_local, fn = _batched_metric(model, tokens, batch_size, labels,
                                                        metric, position)
        chosen = _layer_pairs(graph, pairs)
        if isinstance(upper, dict):
            names = [f"{a.name}->{b.name}" for a, b in chosen]
            unknown = sorted(set(upper) - set(names))
            if unknown:
                raise TLDegenError(f"upper names {unknown}, which are not pairs ablated here; "
                                   f"use pair names such as {names[0]!r}")
        fingerprint = {"pairs": [f"{a.name}->{b.name}" for a, b in chosen],
                       "n_edges": None if n_edges is None else [int(k) for k in n_edges],
                       "tolerance": tolerance, "upper": upper, "position": position,
                       "dtype": str(dtype),
                       "metric": metric if isinstance(metric, str) else "function"}
        if shards.active:
            fingerprint["weights"] = weights_digest(model)
            fingerprint["edges"] = tensors_digest(
                [graph.edges[p] for p in chosen]
                + [t for b in graph.bases.values() for t in (b.C, b.C_pinv)])
    shards.agree("edge_ablation", fingerprint)
    (n_total,) = shards.sum_ints([n_local])

    with prepared(model, dtype), torch.no_grad():
        baseline = _unablated_metric(adapter, batches, fn, shards) / n_total
        results: dict[str, dict[int, float]] = {}
        required: dict[str, int] = {}
        for in_site, out_site in chosen:
            key = f"{in_site.name}->{out_site.name}"
            with shards.step(f"edge_ablation (reading {key})"):
                pair = _MaskedPair(adapter, batches, graph.bases, in_site, out_site, fn)
            kept = _KeptEdges(graph, in_site, out_site, pair, shards, n_total)
            for k in tqdm(list(n_edges or []), desc=f"edge ablation {key}",
                          disable=not progress):
                kept(min(int(k), kept.total))
            probed: dict[int, float] = {}
            if tolerance is not None:
                top = upper.get(key, kept.total) if isinstance(upper, dict) else (
                    kept.total if upper is None else upper)
                required[key], probed = _bisect(kept, min(int(top), kept.total), baseline,
                                                tolerance,
                                                desc=f"bisecting {key}", progress=progress)
            for k in n_edges or []:
                probed[int(k)] = kept(int(k))
            results[key] = dict(sorted(probed.items()))
    return EdgeAblationResult(baseline, results, required, tolerance)


def _layer_pairs(graph, pairs: Sequence[tuple[str | Site, str | Site]] | None
                 ) -> list[tuple[Site, Site]]:
    """The layer pairs to ablate (all of the graph's by default); raises on a pair that is
    not one of the graph's."""
    if pairs is not None and (isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence)
                              or not pairs or any(not isinstance(p, (tuple, list)) or len(p) != 2
                                                  for p in pairs)):
        raise TLDegenError(f"pairs must be a non-empty list of (in_site, out_site) pairs, e.g. "
                           f"[('resid_pre.0', 'resid_mid.0:last')], got {pairs!r}")
    chosen = graph.pairs() if pairs is None else [
        (graph.bases._key(a), graph.bases._key(b)) for a, b in pairs]
    for p in chosen:
        if p not in graph.edges:
            raise TLDegenError(f"{p[0].name} -> {p[1].name} is not a layer pair of this graph")
    return chosen


def _unablated_metric(adapter, batches, fn, shards: Shards) -> float:
    """The metric of the unablated model, summed over every rank's data."""
    baseline, offset = 0.0, 0
    with shards.step("edge_ablation (unablated metric)"):
        for b in batches:
            (logits,) = adapter.read_sites(b, [Site("logits")])
            baseline += float(fn(logits, slice(offset, offset + b.shape[0])).sum())
            offset += b.shape[0]
    (baseline,) = shards.sum_floats([baseline])
    return baseline


class _KeptEdges:
    """The metric of one layer pair with only its ``k`` strongest edges kept (besides every
    edge out of the constant node), as a mean over every rank's data; each ``k`` evaluated
    once (``total``: the number of edges that can be cut)."""

    def __init__(self, graph, in_site: Site, out_site: Site, pair: _MaskedPair, shards: Shards,
                 n_total: int):
        E = graph.edges[(in_site, out_site)]
        self.shape, self.pair, self.shards, self.n_total = E.shape, pair, shards, n_total
        self.key = f"{in_site.name}->{out_site.name}"
        self.const = graph.constant_node(in_site)  # 0 (LIB, PCA), last (neuron) or None
        self.cols = torch.tensor([j for j in range(E.shape[1]) if j != self.const],
                                 dtype=torch.long)
        self.order = E[:, self.cols].flatten().argsort(descending=True)
        self.total = self.order.numel()
        self.cache: dict[int, float] = {}

    def mask(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``[n_out, n_in]`` edge mask keeping the ``k`` strongest edges, and the number
        kept in each row besides the constant node's."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        width = len(self.cols)
        idx = self.order[:k]
        mask[idx // width, self.cols[idx % width]] = True
        counts = mask[:, self.cols].sum(1)
        if self.const is not None:
            mask[:, self.const] = True
        return mask, counts

    def __call__(self, k: int) -> float:
        k = min(k, self.total)
        if k not in self.cache:
            mask, counts = self.mask(k)
            with self.shards.step(f"edge_ablation ({self.key}, {k} edges)"):
                local = self.pair.evaluate(mask, counts)
            self.cache[k] = self.shards.sum_floats([local])[0] / self.n_total
        return self.cache[k]


def _bisect(metric_at: Callable[[int], float], top: int, baseline: float, tolerance: float, *,
            desc: str, progress: bool) -> tuple[int, dict[int, float]]:
    """The fewest edges whose metric lies within ``tolerance`` of ``baseline``, by bisection
    (``lo = 0``, ``hi = top``, probe ``ceil((lo + hi) / 2)`` until ``hi − lo = 1``: the
    reference implementation's schedule), and the metric at every probe."""
    lo, hi = 0, top
    steps = tqdm(total=1 + max(0, hi - 1).bit_length(), desc=desc, disable=not progress)
    probed = {hi: metric_at(hi)}
    steps.update()
    while hi - lo > 1:
        mid = (lo + hi + 1) // 2
        probed[mid] = metric_at(mid)
        steps.update()
        if abs(probed[mid] - baseline) <= tolerance:
            hi = mid
        else:
            lo = mid
    steps.close()
    return hi, probed


#: Bytes the stacked masked copies of one batch may take (edge ablation runs several masks
#: per forward pass, as many as fit).
STACK_BUDGET = 2**28
#: Bytes of output coordinates edge ablation keeps across probes of one layer pair.
CACHE_BUDGET = 2**30


@dataclass
class _Batch:
    tokens: Tensor
    h: Tensor  # [b, n_in, k_in] input-site coordinates, float64
    dtype: torch.dtype
    section: Section | None  # a closed form with a forward, or None (run the model)
    logits: Tensor | None  # unablated logits, kept when the out-site is the logits


class _MaskedPair:
    """Edge ablation of one layer pair ``in → out``, with everything reusable across probes.

    Output coordinate ``i`` under an edge mask depends only on mask row ``m_i``, and at a
    probe keeping ``k`` edges row ``i`` keeps its first ``n_i(k)`` edges in the global order,
    so coordinates are cached by ``(i, n_i)``: a bisection recomputes only the rows whose count
    changed. The input site is read once per batch; the section is evaluated in closed form
    when it has one (its ``forward``: only the section, only the positions read), else by
    the model with many masks stacked along the batch.
    """

    def __init__(self, adapter, batches, bases, in_site: Site, out_site: Site, fn):
        self.adapter, self.in_site, self.out_site = adapter, in_site, out_site
        self.fn = fn
        dev = adapter.device
        b_in, b_out = bases[in_site], bases[out_site]
        self.C_in, self.Cp_in = b_in.C.to(dev), b_in.C_pinv.to(dev)
        self.C_out, self.Cp_out = b_out.C.to(dev), b_out.C_pinv.to(dev)
        self.cache: dict[tuple[int, int], list[Tensor]] = {}
        self.cache_bytes = 0
        self.batches: list[_Batch] = []
        kept_logits = 0
        # recognised once per prompt length, checked against the model there
        plan = SectionPlan(adapter, in_site, out_site, alphas=[1.0], weights=[1.0])
        for tokens in batches:
            sites = [in_site] + ([Site("logits")] if out_site.kind == "logits" else [])
            x, *rest = adapter.read_sites(tokens, sites)
            logits = None
            if rest and kept_logits + rest[0].numel() * rest[0].element_size() <= CACHE_BUDGET:
                logits = rest[0]
                kept_logits += logits.numel() * logits.element_size()
            with torch.enable_grad():  # the closed form is checked against autograd
                section = plan.closed(tokens, x)
            if section is not None and section.forward(x[:1]) is None:
                section = None
            self.batches.append(_Batch(tokens, x.double() @ self.C_in, x.dtype, section, logits))

    def _per_run(self, item: _Batch) -> int:
        """Masks per forward pass: as many stacked copies of the batch as fit the budget."""
        a = self.adapter
        b, n_pos = item.tokens.shape
        width = max(a.d_model, a.d_mlp or 0, self.C_in.shape[0], self.C_out.shape[0])
        if item.section is not None and not isinstance(item.section, AttentionFormula):
            n_pos = len(self.out_site.resolve_positions(n_pos))
        per_mask = b * n_pos * width * max(item.h.element_size(), 4) * 6
        return max(1, STACK_BUDGET // per_mask)

    def _outputs(self, item: _Batch, masks: Tensor) -> Tensor:
        """The out-site vectors ``[G, b, n_out, d_out]`` (float64) for ``G`` input masks."""
        G = masks.shape[0]
        b = item.h.shape[0]
        masked = masks[:, :, None].to(self.Cp_in) * self.Cp_in  # [G, k_in, d_in]: C⁺ rows kept
        x = torch.matmul(item.h.reshape(1, -1, item.h.shape[-1]), masked).to(item.dtype)
        x = x.view(G, b, *item.h.shape[1:-1], -1)
        if self.in_site.has_constant:
            x[..., -1] = 1.0
        x = x.reshape(G * b, *x.shape[2:])
        if item.section is not None:
            y = item.section.forward(x)
        else:
            y = self.adapter.run(item.tokens.repeat(G, 1), read=self.out_site,
                                 write=(self.in_site, x))
        return y.double().reshape(G, b, *y.shape[1:])

    def _linear_coords(self, item: _Batch, mask: Tensor) -> Tensor | None:
        """For a linear section ``y = x J``, every output direction at once:
        ``out[b,t,i] = Σ_j h[b,t,j] m[i,j] A[j,i] + c[i]`` with ``A = C⁺ J C_out`` (the
        constant coordinate of the masked input reset to 1, as in the model runs)."""
        section = item.section
        if not isinstance(section, LinearSection):
            return None
        J = section.J.double()
        Cp = self.Cp_in.double().clone()
        c = torch.zeros(self.C_out.shape[1], dtype=torch.float64, device=Cp.device)
        if self.in_site.has_constant:
            Cp[:, -1] = 0.0
            c = J[-1] @ self.C_out
        A = Cp @ J @ self.C_out  # [k_in, k_out]
        h = item.h[:, section.in_rows]  # [b, n_out, k_in]
        return h @ (mask.T.to(A) * A) + c

    def evaluate(self, mask: Tensor, counts: Tensor) -> float:
        """Sum of the metric over this rank's data with the ``[k_out, k_in]`` edge mask
        (``counts[i]``: edges kept in row ``i`` besides the constant node's)."""
        linear = [self._linear_coords(item, mask.to(self.adapter.device))
                  for item in self.batches]
        if all(out is not None for out in linear):
            return self._metric(linear)
        keys = [(i, int(n)) for i, n in enumerate(counts.tolist())]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            dev = self.adapter.device
            groups, inverse = mask[missing].unique(dim=0, return_inverse=True)
            new: dict[tuple[int, int], list[Tensor]] = {keys[i]: [] for i in missing}
            for item in self.batches:
                per_run = self._per_run(item)
                for start in range(0, len(groups), per_run):
                    chunk = groups[start:start + per_run].to(dev)
                    y = self._outputs(item, chunk)
                    for g in range(chunk.shape[0]):
                        rows = [missing[r] for r in (inverse == start + g).nonzero()[:, 0]]
                        coords = y[g] @ self.C_out[:, rows]  # [b, n_out, len(rows)]
                        for c, i in enumerate(rows):
                            new[keys[i]].append(coords[..., c])
            lookup = {key: new[key] if key in new else self.cache[key] for key in keys}
            size = sum(t.numel() * t.element_size() for v in new.values() for t in v)
            if self.cache_bytes + size > CACHE_BUDGET:  # start over; results are unchanged
                self.cache.clear()
                self.cache_bytes = 0
            self.cache.update(new)
            self.cache_bytes += size
        else:
            lookup = self.cache
        return self._metric([torch.stack([lookup[key][bi] for key in keys], dim=-1)
                             for bi in range(len(self.batches))])

    def _metric(self, coords: list[Tensor]) -> float:
        """Summed metric with the out-site rebuilt from ``coords`` (one ``[b, n_out, k_out]``
        per batch) and the rest of the network run unchanged."""
        total, offset = 0.0, 0
        for item, out_coords in zip(self.batches, coords):
            x_out = (out_coords @ self.Cp_out).to(item.dtype)
            tokens = item.tokens
            if self.out_site.kind == "logits":
                full = item.logits if item.logits is not None else self.adapter.read_sites(
                    tokens, [Site("logits")])[0]
                full = full.clone()
                full[:, self.out_site.resolve_positions(tokens.shape[1])] = x_out
                logits = full
            else:
                x_out[..., -1] = 1.0
                logits = self.adapter.run(tokens, read=Site("logits"),
                                          write=(self.out_site, x_out))
            total += float(self.fn(logits, slice(offset, offset + tokens.shape[0])).sum())
            offset += tokens.shape[0]
        return total
