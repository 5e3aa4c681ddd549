"""Single edges patched: :func:`path_patch`, :class:`PathPatchResult`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen import checks
from tl_degen.adapters import get_adapter
from tl_degen.errors import ArgumentError, DataError, SiteError
from tl_degen.io import Serialisable, as_tensor
from tl_degen.model_state import prepared
from tl_degen.patching.common import (
    Metric,
    _check_finite,
    _check_mode,
    _metric,
    _pair_tokens,
    _run_metric,
)
from tl_degen.sites import Site


# ---------------------------------------------------------------------------- path patching
@dataclass
class PathPatchResult(Serialisable):
    """The metric after patching single edges of the interaction graph.

    Attributes:
        in_site, out_site: the layer pair.
        edges: ``(j, i)`` pairs, source direction ``j`` at ``in_site`` → target direction
            ``i`` at ``out_site`` (``i = None``: every target direction).
        values: ``[n_edges]`` mean metric with that edge patched.
        base, clean, corrupted: unpatched metrics (``base`` is the run patched into).
        strengths: ``[n_edges]`` the graph's edge strengths ``E[i, j]`` (NaN for ``i = None``).

    ``to_dict()`` gives the constructor's arguments: ``{"in_site": name, "out_site": name,
    "mode", "edges": [[j, i or None], ...], "values": tensor, "base", "clean", "corrupted",
    "strengths": tensor}``; ``from_dict`` / ``save`` / ``load`` round-trip it
    (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is the same with the tensors as lists
    (JSON; NaN strengths as null), which ``from_dict`` reads too.

    Examples:
        >>> res = tl_degen.path_patch(model, clean, corrupted, graph, "resid_pre.0",
        ...                           "resid_mid.0:last", logit_diff, edges=[(1, 1), (2, None)])
        >>> res.effects, res.strengths  # both [n_edges]
        >>> res.save("paths.safetensors"); tl_degen.PathPatchResult.load("paths.safetensors")
    """

    in_site: Site
    out_site: Site
    mode: str
    edges: list[tuple[int, int | None]]
    values: Float[Tensor, " n_edges"]
    base: float
    clean: float
    corrupted: float
    strengths: Float[Tensor, " n_edges"]

    @property
    def effects(self) -> Float[Tensor, " n_edges"]:
        return self.values - self.base

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"in_site": self.in_site.name, "out_site": self.out_site.name, "mode": self.mode,
                "edges": [list(e) for e in self.edges], "values": self.values,
                "base": self.base, "clean": self.clean, "corrupted": self.corrupted,
                "strengths": self.strengths}

    @classmethod
    def from_dict(cls, d: dict) -> PathPatchResult:
        """Rebuild from :meth:`to_dict` (or :meth:`as_dict`)."""
        strengths = d["strengths"]
        if not isinstance(strengths, Tensor):
            strengths = [float("nan") if v is None else v for v in strengths]
        return cls(Site.parse(d["in_site"]), Site.parse(d["out_site"]), d["mode"],
                   [(int(j), None if i is None else int(i)) for j, i in d["edges"]],
                   as_tensor(d["values"]), d["base"], d["clean"], d["corrupted"],
                   as_tensor(strengths))

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable; NaN strengths become null)."""
        return {"in_site": self.in_site.name, "out_site": self.out_site.name, "mode": self.mode,
                "edges": [list(e) for e in self.edges], "values": self.values.tolist(),
                "base": self.base, "clean": self.clean, "corrupted": self.corrupted,
                "strengths": [None if v != v else v for v in self.strengths.tolist()]}

    def __repr__(self) -> str:
        order = self.effects.abs().argsort(descending=True)[:5].tolist()
        rows = "\n".join(
            f"    {self.in_site.name}/{self.edges[n][0]} -> {self.out_site.name}/"
            f"{'*' if self.edges[n][1] is None else self.edges[n][1]}: "
            f"{float(self.effects[n]):+.5g} (E={float(self.strengths[n]):.3g})" for n in order)
        return (f"PathPatchResult({self.in_site.name!r} -> {self.out_site.name!r}, "
                f"mode={self.mode!r}, {len(self.edges)} edges, base={self.base:.5g})\n"
                f"  largest effects:\n{rows}")


def path_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    graph,
    in_site: str | Site,
    out_site: str | Site,
    metric: Metric,
    *,
    edges: Sequence[tuple[int, int | None]] | None = None,
    top_k: int = 20,
    mode: str = "denoising",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> PathPatchResult:
    """Patch single edges of the interaction graph: source direction ``j`` at ``in_site``
    reaches target direction ``i`` at ``out_site``, and nothing else changes.

    In the target run, the out-site coordinate ``i`` is recomputed by the section
    ``F(h) = f(h C⁺_in) C_out`` from the in-site coordinates with ``h[j]`` taken from the
    source run (all other in-coordinates and every other out-coordinate stay as in the target
    run); the rest of the network then runs from the out-site. The out-site must be a cut
    (every later computation depends on the model only through it), which consecutive
    graph sites are. With ``i = None`` every out-coordinate is recomputed: for an out-site
    basis that drops nothing this equals :func:`patch_directions` of ``j`` at ``in_site``.

    Args:
        clean_tokens, corrupted_tokens: ``[batch, pos]`` paired prompts.
        graph: an :class:`~tl_degen.graph.InteractionGraph` of this model.
        in_site, out_site: a consecutive pair of the graph.
        metric: function of the logits ``[batch, pos, d_vocab]`` → scalar or ``[batch]``.
        edges: ``(j, i)`` pairs (source, target; the graph's ``edges[(in, out)][i, j]``);
            default: the ``top_k`` strongest edges, constant node excluded.
        mode: ``"denoising"`` or ``"noising"``, as in :func:`patch_directions`.

    Returns:
        A :class:`PathPatchResult`.

    Examples:
        >>> clean, corrupted, logit_diff = modadd.patching_pairs(500)
        >>> res = tl_degen.path_patch(model, clean, corrupted, graph, "resid_mid.0:last",
        ...                           "resid_post.0:last", logit_diff, top_k=10)
        >>> res.effects  # [n_edges]
    """
    _check_mode(mode)
    from tl_degen.graph import InteractionGraph

    checks.instance("graph", graph, InteractionGraph, "interaction_graph")
    bases = graph.bases
    bases.check_model(model)
    a, b = Site.parse(in_site), Site.parse(out_site)
    if (a, b) not in graph.edges:
        raise SiteError(f"{a.name} -> {b.name} is not a consecutive pair of this graph; pairs: "
                        f"{[f'{p.name} -> {q.name}' for p, q in graph.pairs()]}")
    E = graph.edges[(a, b)]
    b_in, b_out = bases[a], bases[b]
    top_k = checks.integer("top_k", top_k, minimum=1)
    if edges is not None and (isinstance(edges, (str, bytes)) or any(
            not isinstance(e, (tuple, list)) or len(e) != 2 or not checks._is_int(e[0])
            or not (e[1] is None or checks._is_int(e[1])) for e in edges)):
        raise ArgumentError(f"edges must be a list of (input direction, output direction or "
                            f"None) integer pairs, e.g. [(3, 0), (5, None)], got {edges!r}")
    if edges is None:
        masked = E.clone()
        c = graph.constant_node(a)
        if c is not None:  # edges out of the constant node never change (Δc = 0)
            masked[:, c] = -1.0
        flat = masked.flatten().argsort(descending=True)[:top_k]
        edges = [(int(f % E.shape[1]), int(f // E.shape[1])) for f in flat]
    edges = [(int(j), None if i is None else int(i)) for j, i in edges]
    for j, i in edges:
        if not 0 <= j < b_in.k or (i is not None and not 0 <= i < b_out.k):
            raise DataError(f"edge ({j}, {i}) out of range: {a.name} has {b_in.k} directions, "
                            f"{b.name} has {b_out.k}")
    adapter = get_adapter(model)
    clean, corrupted = _pair_tokens(adapter, clean_tokens, corrupted_tokens)
    fn = _metric(metric)
    source, target = (clean, corrupted) if mode == "denoising" else (corrupted, clean)
    dev = adapter.device
    C_in, Cp_in = b_in.C.to(dev), b_in.C_pinv.to(dev)
    C_out, Cp_out = b_out.C.to(dev), b_out.C_pinv.to(dev)
    values = []
    with prepared(model, dtype), torch.no_grad():
        m_clean = float(fn(adapter.read_sites(clean, [Site("logits")])[0]).mean())
        m_corr = float(fn(adapter.read_sites(corrupted, [Site("logits")])[0]).mean())
        (x_s,) = adapter.read_sites(source, [a])
        (x_t, y_t) = adapter.read_sites(target, [a, b])
        _check_finite(x_s, x_t, site=a)
        h_diff = (x_s - x_t).double() @ C_in
        out_t = y_t.double() @ C_out
        section: dict[int, Tensor] = {}
        for j, i in tqdm(edges, desc=f"path patching {a.name} -> {b.name}",
                         disable=not progress):
            if j not in section:
                x = (x_t.double() + h_diff[..., j : j + 1] @ Cp_in[j : j + 1]).to(x_t.dtype)
                x[..., -1] = 1.0
                section[j] = adapter.run(target, read=b, write=(a, x)).double() @ C_out
            change = section[j] - out_t
            if i is not None:
                keep = torch.zeros(b_out.k, dtype=torch.float64, device=dev)
                keep[i] = 1.0
                change = change * keep
            y = y_t.double() + change @ Cp_out
            if b.kind == "logits":
                logits = adapter.read_sites(target, [Site("logits")])[0].clone()
                logits[:, b.resolve_positions(target.shape[1])] = y.to(logits.dtype)
                values.append(float(fn(logits).mean()))
                continue
            y = y.to(y_t.dtype)
            y[..., -1] = 1.0
            values.append(float(_run_metric(adapter, target, fn, write=(b, y)).mean()))
    strengths = torch.tensor([float("nan") if i is None else float(E[i, j]) for j, i in edges],
                             dtype=torch.float64)
    return PathPatchResult(a, b, mode, edges, torch.tensor(values, dtype=torch.float64),
                           m_corr if mode == "denoising" else m_clean, m_clean, m_corr,
                           strengths)
