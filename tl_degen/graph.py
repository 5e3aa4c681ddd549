"""Interaction graphs: edges between the bases of consecutive sites (DESIGN.md §4 step 8).

Conventions (pinned here):

* Nodes of a site are its basis directions, in column order of ``C``: the constant node
  first (when the basis is centered), then by descending eigenvalue. Node ``j`` of site
  ``"resid_pre.0"`` is written ``"resid_pre.0/j"``.
* ``graph.edges[(in_site, out_site)]`` is a non-negative ``[n_out, n_in]`` tensor: row =
  target node (output site), column = source node (input site). Only consecutive sites
  have edges.
* ``E[i, j] = (1/(N·P_in)) Σ_b Σ_t A[b,t,i,j]²`` with
  ``A[b,t,i,j] = Σ_s ∂F[t,i]/∂h[s,j] · h[s,j]`` and ``F(h) = f(h C⁺_in) C_out`` evaluated
  at the projected input ``h = x C_in`` (integrated over ``α·h`` for the integrated rules).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from tl_degen import checks
from tl_degen.adapters import Adapter, get_adapter
from tl_degen.basis import output_basis
from tl_degen.basis_set import BasisSet
from tl_degen.checkpoint import FitCheckpoint
from tl_degen.distributed import Shards, tensors_digest, tokens_digest, weights_digest
from tl_degen.errors import BasisMismatchError, DataError, SiteError, TLDegenError
from tl_degen.fitting import check_positions, token_batches
from tl_degen.io import Serialisable, check_stored, read_safetensors, save_safetensors_atomic
from tl_degen.model_state import prepared
from tl_degen.progress import RunBar, stage_bar
from tl_degen.sections.autograd import EDGE_ROUTES
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.reader import BatchReader
from tl_degen.sections.rules import integration_rule
from tl_degen.sites import Site
from tl_degen.stats import EstimateAccumulator, StochasticEstimate

__all__ = ["interaction_graph", "InteractionGraph", "Modules", "GRAPH_FORMAT", "GRAPH_VERSION"]

GRAPH_FORMAT = "tl_degen.interaction_graph"
GRAPH_VERSION = 1


def interaction_graph(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    bases: BasisSet,
    *,
    integration: str = "gradient",
    n_alpha: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    progress: bool | RunBar = True,
    closed_form: bool = True,
    n_probes: int | None = None,
    probe_groups: int = 4,
    seed: int = 0,
    route: str | None = None,
    distributed: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> InteractionGraph:
    """Edges between every pair of consecutive sites of ``bases`` (DESIGN.md §4 step 8).

    Args:
        model: the model the bases were fitted on (checked).
        tokens: ``[batch, pos]`` token ids, an iterable of batches, or prompts of different
            lengths (as :func:`tl_degen.fit_bases` takes them).
        bases: a :class:`~tl_degen.basis_set.BasisSet` with at least two sites.
        integration, n_alpha: integration rule for ``A`` (as in :func:`tl_degen.fit_bases`).
        batch_size: sequences per forward pass (default: as many as fit the memory budget,
            :mod:`tl_degen.memory`).
        dtype: dtype the model runs in (restored afterwards); accumulation is float64.
        closed_form: use the closed forms of :mod:`tl_degen.sections` where they apply
            (``False``: autograd everywhere; the results agree to rounding).
        n_probes, probe_groups, seed: estimate the sum over output positions with random ±1
            probes (DESIGN.md §4 step 9) where no closed form applies; the relative standard
            error of each pair's edges is in ``graph.errors``.
        route: how sections without a closed form are differentiated: ``"forward"`` (one
            Jacobian-vector product per input direction), ``"backward"`` (one vector-Jacobian
            product per output position and direction), ``"probes"`` (needs ``n_probes``);
            ``None`` (default) takes the cheapest, :func:`tl_degen.sections.edge_route`. The
            routes taken are in ``graph.config["edge_routes"]``.
        distributed: inside a ``torch.distributed`` process group each rank passes its own
            shard of ``tokens``; edge sums are added over ranks and every rank returns the
            graph of all shards (:mod:`tl_degen.distributed`; ``False`` opts out).
        progress: a progress bar per pair; a :class:`~tl_degen.progress.RunBar` draws the
            pairs as stages of one bar over a longer run.
        checkpoint: a file to keep the finished pairs' edges in, written atomically after
            each pair. If it exists, the graph resumes from it, skipping those pairs (a
            checkpoint of another model, bases, tokens or settings is refused with
            :class:`~tl_degen.errors.CheckpointError` and left alone); it is removed when the
            graph completes. Under ``torch.distributed`` each rank keeps
            ``<checkpoint>.rank<r>``.

    Returns:
        An :class:`InteractionGraph`; ``graph.edges[(in_site, out_site)]`` is
        ``[n_out, n_in]``, non-negative, nodes ordered as the basis columns;
        ``graph.config["edge_routes"]`` and ``["edge_seconds"]`` say, per pair, how its
        edges were computed and in how many seconds (of this call; resumed pairs: of the
        call that computed them).

    Examples:
        >>> graph = interaction_graph(model, tokens, bases)
        >>> graph.edges[(Site.parse("resid_pre.0"), Site.parse("resid_mid.0:last"))].shape
    """
    shards = Shards(distributed)
    with shards.step("interaction_graph (checking the arguments)"):
        probe_groups = checks.integer("probe_groups", probe_groups, minimum=1)
        seed = checks.integer("seed", seed, minimum=0, maximum=2**63 - 1)
        closed_form = checks.boolean("closed_form", closed_form)
        adapter, batches, alphas, weights = _check_graph_arguments(
            model, tokens, bases, integration=integration, n_alpha=n_alpha, route=route,
            n_probes=n_probes, batch_size=batch_size, dtype=dtype)
        fingerprint = {"sites": [s.name for s in bases.sites],
                       "settings": [integration, len(alphas), str(dtype), closed_form,
                                    n_probes, probe_groups, seed, route]}
        if shards.active:
            fingerprint["weights"] = weights_digest(model)
            fingerprint["bases"] = _bases_digest(bases)
    shards.agree("interaction_graph", fingerprint)
    sites = list(bases.sites)
    edges: dict[tuple[Site, Site], Tensor] = {}
    errors: dict[tuple[Site, Site], float] = {}
    edge_routes: dict[str, str] = {}
    edge_seconds: dict[str, float] = {}
    ckpt, saved = _graph_checkpoint(checkpoint, model, bases, batches, fingerprint, shards)
    generator = torch.Generator().manual_seed(shards.seed(seed))
    with prepared(model, dtype):
        plans = [SectionPlan(adapter, in_site, out_site, alphas=alphas, weights=weights,
                             closed_form=closed_form, n_probes=n_probes,
                             n_groups=probe_groups, generator=generator, route=route)
                 for in_site, out_site in zip(sites, sites[1:])]
        # the input sites (not past the last), the sections between them by formula if they can
        inputs = BatchReader(adapter, batches, sites[:-1], plans[:-1], after=plans[-1])
        for k, pair in enumerate(zip(sites, sites[1:])):
            name = f"{pair[0].name}->{pair[1].name}"
            if name in saved.get("pairs", {}):  # finished before the run was interrupted
                done = saved["pairs"][name]
                edges[pair] = saved["tensors"][f"edges.{k}"]
                if done["error"] is not None:
                    errors[pair] = done["error"]
                edge_routes[name], edge_seconds[name] = done["route"], done["seconds"]
                stage_bar(progress, len(batches), f"edges {name} (checkpoint)",
                          len(batches)).close()
                continue
            start = time.perf_counter()
            with shards.step(f"interaction_graph ({pair[0].name} → {pair[1].name})"):
                local = _edge_sums(adapter, batches, inputs, bases, plans, k,
                                   n_groups=probe_groups if n_probes else 0, progress=progress)
            total = local.merged(shards)
            E = total.total()
            if n_probes is not None:
                errors[pair] = total.relative_error()
            if not torch.isfinite(E).all():
                raise DataError(f"NaN/Inf edges between {pair[0].name} and {pair[1].name}")
            edges[pair] = (E / total.count).cpu()
            edge_routes[name] = "+".join(sorted(plans[k].routes))
            edge_seconds[name] = round(time.perf_counter() - start, 3)
            if ckpt is not None:
                saved.setdefault("pairs", {})[name] = {
                    "route": edge_routes[name], "seconds": edge_seconds[name],
                    "error": errors.get(pair)}
                saved.setdefault("tensors", {})[f"edges.{k}"] = edges[pair]
                ckpt.save({"pairs": saved["pairs"]}, saved["tensors"])
    (n_samples,) = shards.sum_ints([sum(b.shape[0] for b in batches)])
    config = {"integration": integration, "n_alpha": len(alphas),
              "n_samples": n_samples, "n_pos": max(b.shape[1] for b in batches),
              "n_probes": n_probes, "seed": seed, "edge_routes": edge_routes,
              "edge_seconds": edge_seconds}
    if ckpt is not None:
        ckpt.remove()
    return InteractionGraph(bases, edges, config=config, errors=errors)


def _graph_checkpoint(path, model, bases: BasisSet, batches: list[Tensor], fingerprint: dict,
                      shards: Shards) -> tuple[FitCheckpoint | None, dict]:
    """This rank's graph checkpoint (fingerprinted with the call, the model's weights, the
    bases and this rank's tokens) and what it holds: ``{"pairs": {name: {"route",
    "seconds", "error"}}, "tensors": {"edges.<k>": edges}}`` (empty for a new run)."""
    if path is None:
        return None, {}
    ckpt = FitCheckpoint(
        FitCheckpoint.for_rank(path, shards.rank, shards.world),
        {**fingerprint, "verb": "interaction_graph", "weights": weights_digest(model),
         "bases": _bases_digest(bases), "tokens": tokens_digest(batches),
         "rank": shards.rank, "world": shards.world}, every=1)
    loaded = ckpt.load()
    if loaded is None:
        return ckpt, {}
    progress, tensors = loaded
    return ckpt, {"pairs": dict(progress.get("pairs", {})),
                  "tensors": {k: check_stored(ckpt.path, k, t) for k, t in tensors.items()}}


def _check_graph_arguments(model, tokens, bases: BasisSet, *, integration: str,
                           n_alpha: int | None, route: str | None, n_probes: int | None,
                           batch_size: int | None, dtype: torch.dtype | None
                           ) -> tuple[Adapter, list[Tensor], list[float], list[float]]:
    """``(adapter, batches, alphas, weights)`` of an :func:`interaction_graph` call; raises
    :class:`~tl_degen.errors.TLDegenError` (or a subclass) on a bad argument."""
    checks.instance("bases", bases, BasisSet, "fit_bases")
    dtype = checks.floating_dtype("dtype", dtype, statistics=True)
    checks.integer("n_probes", n_probes, minimum=1, none=True)
    sites = list(bases.sites)
    if len(sites) < 2:
        raise TLDegenError("an interaction graph needs bases of at least two sites")
    adapter = get_adapter(model)
    bases.check_model(adapter)
    alphas, weights = integration_rule(integration, n_alpha)
    if route is not None and route not in EDGE_ROUTES:
        raise TLDegenError(f"unknown route {route!r}; use one of {', '.join(EDGE_ROUTES)} "
                           "or None (the cheapest)")
    if route == "probes" and n_probes is None:
        raise TLDegenError('route="probes" needs n_probes (e.g. n_probes=64)')
    batches = token_batches(tokens, batch_size, adapter,
                            torch.finfo(dtype or adapter.dtype).bits // 8)
    for s in sites:
        check_positions(s, batches)
    return adapter, batches, alphas, weights


def _edge_sums(adapter: Adapter, batches: list[Tensor], inputs: BatchReader, bases: BasisSet,
               plans: list[SectionPlan], k: int, *, n_groups: int, progress: bool
               ) -> EstimateAccumulator:
    """This rank's sums of squared attributions ``Σ_b Σ_t A²`` between site ``k`` and site
    ``k + 1`` (exact where the section allows, else in ``n_groups`` probe groups) and the
    number of input rows they run over."""
    in_site, out_site = bases.sites[k], bases.sites[k + 1]
    b_in, b_out = bases[in_site], bases[out_site]
    dt = adapter.dtype
    C_in, C_pinv = b_in.C.to(adapter.device), b_in.C_pinv.to(adapter.device)
    out_C = output_basis(b_out)
    out_C = None if out_C is None else out_C.to(adapter.device, dt)
    acc = EstimateAccumulator((b_out.k, b_in.k), n_groups, device=adapter.device)
    bar = stage_bar(progress, len(batches), f"edges {in_site.name} → {out_site.name}")
    for i, batch in enumerate(batches):
        x = inputs.read(i, k)
        y = inputs.kept(i, k + 1) if k + 1 < len(plans) else None
        h = x.double() @ C_in  # [b, P_in, k_in]
        x_proj = (h @ C_pinv).to(dt)
        acc.add_count(x.shape[0] * x.shape[1])
        out = plans[k].edge_squares(batch, x, x_proj, h, C_pinv, out_C, y)
        if isinstance(out, StochasticEstimate):
            acc.add_estimate(out)
        else:
            acc.add_exact(out)
        bar.update()
    bar.close()
    return acc


@dataclass
class Modules(Serialisable):
    """Leiden communities of an interaction graph.

    Attributes:
        membership: node name (``"site/j"``) → module id.
        modularity: the modularity ``Q`` of the partition on the undirected weighted graph.
        resolution: the resolution parameter used.

    ``to_dict()`` is ``{"membership": {...}, "modularity": Q, "resolution": r}``;
    ``from_dict`` / ``save`` / ``load`` round-trip it (:class:`tl_degen.io.Serialisable`).

    Examples:
        >>> modules = graph.modules(resolution=1.0)
        >>> modules.modularity, modules.clusters[0][:5]
        >>> viz.save_graph_page(graph, "graph.html", modules=modules)
    """

    membership: dict[str, int]
    modularity: float
    resolution: float

    def to_dict(self) -> dict:
        """The constructor's arguments (class docstring)."""
        return {"membership": dict(self.membership), "modularity": self.modularity,
                "resolution": self.resolution}

    @classmethod
    def from_dict(cls, d: dict) -> Modules:
        checks.fields("Modules.from_dict", d, ("membership", "modularity", "resolution"))
        return cls(dict(d["membership"]), d["modularity"], d["resolution"])

    @property
    def clusters(self) -> list[list[str]]:
        out: dict[int, list[str]] = {}
        for node, m in self.membership.items():
            out.setdefault(m, []).append(node)
        return [out[k] for k in sorted(out)]

    def __repr__(self) -> str:
        sizes = sorted((len(c) for c in self.clusters), reverse=True)
        more = "…" if len(sizes) > 10 else ""
        return (f"Modules(n={len(sizes)}, Q={self.modularity:.4f}, "
                f"resolution={self.resolution}, sizes={sizes[:10]}{more})")


class InteractionGraph:
    """Sites, their bases, and non-negative edge matrices between consecutive sites.

    See the module docstring for the conventions: nodes in basis-column order (constant
    first), ``edges[(in_site, out_site)]`` is ``[n_out, n_in]`` (rows = targets).
    ``errors[(in_site, out_site)]`` is the relative standard error of a pair's edges when
    they were estimated with random probes (empty otherwise); ``config`` holds the settings,
    the routes taken among them (``config["edge_routes"]``).

    ``to_dict()`` gives the constructor's arguments, pairs keyed ``"<in>-><out>"``:
    ``{"bases": BasisSet.to_dict(), "edges": {"<in>-><out>": [n_out, n_in] tensor},
    "config": {...}, "errors": {"<in>-><out>": float}}``; ``from_dict(d)`` rebuilds the graph.
    :meth:`save` / :meth:`load` keep all of it.

    Examples:
        >>> graph = tl_degen.interaction_graph(model, tokens, bases)
        >>> graph.edge("resid_pre.0", "resid_mid.0:last").shape  # [n_out, n_in]
        >>> graph.prune(mass=0.99).save("graph.safetensors")
        >>> graph = tl_degen.InteractionGraph.load("graph.safetensors", model=model)
    """

    def __init__(self, bases: BasisSet, edges: dict[tuple[Site, Site], Tensor], *,
                 config: dict | None = None,
                 errors: dict[tuple[Site, Site], float] | None = None):
        self.bases = bases
        self.sites = list(bases.sites)
        self.edges = dict(edges)
        self.config = dict(config or {})
        #: relative standard error of each pair's edges when estimated stochastically
        self.errors: dict[tuple[Site, Site], float] = dict(errors or {})
        for (a, b), E in self.edges.items():
            if E.shape != (bases[b].k, bases[a].k):
                raise BasisMismatchError(f"edges {a.name}->{b.name} have shape "
                                         f"{tuple(E.shape)}, expected ({bases[b].k}, {bases[a].k})")

    # ------------------------------------------------------------------ access
    def pairs(self) -> list[tuple[Site, Site]]:
        return list(self.edges)

    def edge(self, in_site: str | Site, out_site: str | Site) -> Tensor:
        """``[n_out, n_in]`` edges between two consecutive sites (names or Sites)."""
        a, b = self.bases._key(in_site), self.bases._key(out_site)
        if (a, b) not in self.edges:
            raise SiteError(f"{a.name} -> {b.name} is not a layer pair of this graph; its "
                            "pairs: " + ", ".join(f"{x.name} -> {y.name}" for x, y in self.pairs()))
        return self.edges[(a, b)]

    @staticmethod
    def node_name(site: Site, j: int) -> str:
        return f"{site.name}/{j}"

    def constant_node(self, site: str | Site) -> int | None:
        """Index of the site's constant direction: 0 for centered LIB/PCA bases, the last
        column for neuron bases (the raw constant coordinate), None without one."""
        site = self.bases._key(site)
        b = self.bases[site]
        if self._has_constant_node(site):
            return 0
        if b.method == "neuron" and b.has_constant:
            return b.k - 1
        return None

    def _has_constant_node(self, site: Site) -> bool:
        b = self.bases[site]
        return b.center and b.has_constant and b.method != "neuron"

    # ------------------------------------------------------------------ pruning
    def prune(self, *, threshold: float | None = None, top_k: int | None = None,
              mass: float | None = None, keep_constant: bool = True) -> InteractionGraph:
        """A copy keeping only some edges (the rest set to 0). Exactly one criterion:

        * ``threshold``: edges ``>= threshold``;
        * ``top_k``: for every target node, its ``top_k`` strongest incoming edges;
        * ``mass``: per layer pair, the fewest strongest edges whose sum is at least
          ``mass`` (a fraction in (0, 1]) of the pair's total.

        Edges out of the constant node are kept when ``keep_constant``.
        """
        given = [v is not None for v in (threshold, top_k, mass)]
        if sum(given) != 1:
            raise TLDegenError("prune() takes exactly one of threshold=, top_k=, mass=")
        threshold = checks.number("threshold", threshold, minimum=0, none=True)
        mass = checks.number("mass", mass, above=0, maximum=1, none=True)
        top_k = checks.integer("top_k", top_k, minimum=0, none=True)
        keep_constant = checks.boolean("keep_constant", keep_constant)
        new = {}
        for (a, b), E in self.edges.items():
            keep = torch.zeros_like(E, dtype=torch.bool)
            if threshold is not None:
                keep = E >= threshold
            elif top_k is not None:
                k = min(top_k, E.shape[1])
                if k:
                    idx = E.topk(k, dim=1).indices
                    keep.scatter_(1, idx, True)
            else:
                flat = E.flatten()
                order = flat.argsort(descending=True)
                csum = flat[order].cumsum(0)
                n = int((csum < mass * flat.sum() * (1 - 1e-12)).sum()) + 1
                keep.view(-1)[order[: min(n, flat.numel())]] = True
            if keep_constant and self._has_constant_node(a):
                keep[:, 0] = True
            new[(a, b)] = torch.where(keep, E, torch.zeros_like(E))
        return InteractionGraph(self.bases, new, config=self.config, errors=self.errors)

    def n_edges(self) -> dict[str, int]:
        return {f"{a.name}->{b.name}": int((E > 0).sum()) for (a, b), E in self.edges.items()}

    # ------------------------------------------------------------------ export
    def _nodes(self) -> list[dict]:
        out = []
        for s in self.sites:
            b = self.bases[s]
            const = self._has_constant_node(s)
            for j in range(b.k):
                out.append({"id": self.node_name(s, j), "site": s.name, "index": j,
                            "eigenvalue": float(b.eigenvalues[j]),
                            "constant": bool(const and j == 0)})
        return out

    def to_networkx(self):
        """A ``networkx.DiGraph``: nodes ``"site/j"`` (attributes ``site``, ``index``,
        ``eigenvalue``, ``constant``), edges source → target with attribute ``weight``
        (zero edges left out)."""
        import networkx as nx

        G = nx.DiGraph()
        for n in self._nodes():
            G.add_node(n["id"], **{k: v for k, v in n.items() if k != "id"})
        for (a, b), E in self.edges.items():
            for i, j in (E > 0).nonzero().tolist():
                G.add_edge(self.node_name(a, j), self.node_name(b, i), weight=float(E[i, j]))
        return G

    def to_json(self) -> str:
        """JSON text. Schema (version 1)::

            {"format": "tl_degen.interaction_graph", "version": 1,
             "sites": ["resid_pre.0", ...], "config": {...},
             "nodes": [{"id": "resid_pre.0/0", "site": "resid_pre.0", "index": 0,
                        "eigenvalue": 1.2e5, "constant": true}, ...],
             "edges": [{"source": "resid_pre.0/0", "target": "resid_mid.0:last/0",
                        "weight": 9.9e4}, ...]}

        Edges are listed source → target, zero edges left out.
        """
        edges = []
        for (a, b), E in self.edges.items():
            for i, j in (E > 0).nonzero().tolist():
                edges.append({"source": self.node_name(a, j), "target": self.node_name(b, i),
                              "weight": float(E[i, j])})
        return json.dumps({"format": GRAPH_FORMAT, "version": GRAPH_VERSION,
                           "sites": [s.name for s in self.sites], "config": self.config,
                           "nodes": self._nodes(), "edges": edges})

    # ------------------------------------------------------------------ modules
    def modules(self, resolution: float = 1.0, seed: int = 0,
                include_constant: bool = False) -> Modules:
        """Leiden communities (``leidenalg``, RB-configuration model) of the graph made
        undirected, edge weights = edge strengths. The constant nodes are left out unless
        ``include_constant`` (they connect to everything)."""
        import igraph as ig
        import leidenalg

        resolution = checks.number("resolution", resolution, above=0)
        seed = checks.integer("seed", seed, minimum=0)
        include_constant = checks.boolean("include_constant", include_constant)
        names = [n["id"] for n in self._nodes()
                 if include_constant or not n["constant"]]
        index = {n: i for i, n in enumerate(names)}
        pairs, w = [], []
        for (a, b), E in self.edges.items():
            for i, j in (E > 0).nonzero().tolist():
                s, t = self.node_name(a, j), self.node_name(b, i)
                if s in index and t in index:
                    pairs.append((index[s], index[t]))
                    w.append(float(E[i, j]))
        g = ig.Graph(n=len(names), edges=pairs)
        g.es["weight"] = w
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                        weights="weight", resolution_parameter=resolution,
                                        seed=seed)
        q = g.modularity(part.membership, weights="weight") if pairs else 0.0
        return Modules({n: int(m) for n, m in zip(names, part.membership)}, float(q),
                       resolution)

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"bases": self.bases.to_dict(),
                "edges": {f"{a.name}->{b.name}": E for (a, b), E in self.edges.items()},
                "config": dict(self.config),
                "errors": {f"{a.name}->{b.name}": e for (a, b), e in self.errors.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> InteractionGraph:
        """Rebuild from :meth:`to_dict`."""
        checks.fields("InteractionGraph.from_dict", d, ("bases", "edges"))
        bases = BasisSet.from_dict(d["bases"])

        def pair(key: str) -> tuple[Site, Site]:
            a, b = key.split("->")
            return bases._key(a), bases._key(b)

        return cls(bases, {pair(k): E for k, E in d["edges"].items()}, config=d.get("config"),
                   errors={pair(k): e for k, e in (d.get("errors") or {}).items()})

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.safetensors`` file: the bases (as :meth:`BasisSet.save`) and the edges
        (``edges/<in>-><out>``, dtype kept); the header key ``tl_degen_graph`` holds JSON with
        the pairs, ``config`` and ``errors`` (``[{"in", "out", "error"}]``); written
        atomically."""
        path = Path(path)
        tensors, meta = self.bases._tensors_and_meta()
        edge_meta = []
        for (a, b), E in self.edges.items():
            key = f"edges/{a.name}->{b.name}"
            tensors[key] = E.detach().cpu().contiguous()
            edge_meta.append({"in": a.name, "out": b.name, "tensor": key})
        graph_meta = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "edges": edge_meta,
                      "config": self.config,
                      "errors": [{"in": a.name, "out": b.name, "error": e}
                                 for (a, b), e in self.errors.items()]}
        return save_safetensors_atomic(path, tensors, {"tl_degen": json.dumps(meta),
                                                       "tl_degen_graph": json.dumps(graph_meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> InteractionGraph:
        """Read a file written by :meth:`save` (with ``model``: check it is the same model)."""
        bases = BasisSet.load(path, model=model)
        header, tensors = read_safetensors(path)
        if "tl_degen_graph" not in header:
            raise DataError(f"{path} holds bases but no interaction graph")
        try:
            meta = json.loads(header["tl_degen_graph"])
            edges = {(bases._key(e["in"]), bases._key(e["out"])):
                     check_stored(path, e["tensor"], tensors[e["tensor"]], nonnegative=True)
                     for e in meta["edges"]}
            errors = {(bases._key(e["in"]), bases._key(e["out"])): e["error"]
                      for e in meta.get("errors", [])}  # files from before errors: none
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path} has a damaged interaction-graph header ({err!r}); save "
                            "the graph again") from None
        return cls(bases, edges, config=meta.get("config"), errors=errors)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        lines = [f"InteractionGraph({len(self.sites)} sites, method={self.bases.method!r}, "
                 f"n_samples={self.config.get('n_samples')})"]
        for s in self.sites:
            lines.append(f"  {s.name}: {self.bases[s].k} nodes")
        for (a, b), E in self.edges.items():
            lines.append(f"  {a.name} → {b.name}: [{E.shape[0]}×{E.shape[1]}], "
                         f"{int((E > 0).sum())} nonzero, sum {float(E.sum()):.6e}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        """The interactive graph page in a notebook cell (at most 3000 edges drawn, the
        strongest of each pair; prune first to choose)."""
        from tl_degen.viz.graph_page import graph_html

        return graph_html(self, standalone=False)

    def to_circuit_tracer(self, folder: str | os.PathLike, *, slug: str = "tl-degen",
                          **kwargs) -> Path:
        """Write the graph for circuit-tracer's frontend (and Neuronpedia): ``folder/<slug>.json``
        in its graph format, listed in ``folder/graph-metadata.json``. Keyword arguments
        (``labels``, ``modules``, ``top_nodes``, ``prompt_tokens``, …) and the mapping of
        sites, directions and modules: :mod:`tl_degen.viz.circuit_tracer`.

        Examples:
            >>> graph.prune(mass=0.99).to_circuit_tracer("ct_graphs", slug="modadd")
        """
        from tl_degen.viz.circuit_tracer import save_circuit_tracer

        return save_circuit_tracer(self, folder, slug=slug, **kwargs)


def _bases_digest(bases: BasisSet) -> str:
    """A digest of every basis matrix (ranks must hold the same bases)."""
    return tensors_digest([t for b in bases.values() for t in (b.C, b.C_pinv)])
