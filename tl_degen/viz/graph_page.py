"""The interactive interaction-graph page: self-contained HTML (inline SVG, CSS and a little
JavaScript; no network at view time), for a file or a notebook cell.

Why our own SVG rather than a graph library: the layout is fixed by the math (one column per
site, in forward order; nodes in basis order, constant node on top), so no force layout is
needed; a library would add 0.3–3 MB of JavaScript to every page and a CDN or bundling step,
while the SVG is drawn in Python and stays visible even where scripts are blocked (the
script only adds hover details, the pruning slider and the constant-node toggle).

Conventions (as :class:`~tl_degen.graph.InteractionGraph`): node ``"site/j"`` is column ``j`` of
that site's ``C``; an edge is drawn from source (input site, left) to target (output site,
right) for every nonzero ``edges[(in, out)][i, j]``. Open ``page.html#node=<site>/<j>`` to
show one node's details on load. Node radius grows with ``√(Λ/max Λ)`` of
its site; colour is the module when ``modules`` are given, else ``log Λ``. Edge width and
opacity grow with strength relative to the strongest edge of its layer pair.
"""

from __future__ import annotations

import html
import json
import math
import os
import uuid
from pathlib import Path

from tl_degen.errors import TLDegenError
from tl_degen.io import output_path, write_text_atomic

__all__ = ["graph_html", "circuit_svg", "save_graph_page", "DEFAULT_MAX_EDGES"]

DEFAULT_MAX_EDGES = 3000
MODULE_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
]

_CSS = """
.tld-graph{font-family:sans-serif;font-size:12px;position:relative;color:#222}
.tld-graph .controls{margin:6px 0;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
.tld-graph svg{background:#fff;border:1px solid #ddd}
.tld-graph .edge{stroke:#555}
.tld-graph .edge.hl{stroke:#d62728;stroke-opacity:0.9}
.tld-graph .node{stroke:#333;stroke-width:0.6;cursor:pointer}
.tld-graph .node.hl{stroke:#d62728;stroke-width:2}
.tld-graph .tip{position:absolute;display:none;background:#fffbe6;border:1px solid #cc9;
 padding:6px 8px;pointer-events:none;max-width:360px;white-space:pre-line;z-index:10}
.tld-graph .hidden{display:none}
.tld-circuit{font-family:sans-serif;font-size:12px;color:#222}
.tld-circuit svg{background:#fff;border:1px solid #ddd}
.tld-circuit .cedge{stroke:#c0392b}
.tld-circuit .cnode{stroke:#333;stroke-width:0.8}
.tld-circuit .hidden{display:none}
details.tld-all>summary{cursor:pointer;margin:10px 0;font-weight:bold}
"""

_CIRCUIT_JS = """
(function(){
  var root = document.getElementById("%(id)s");
  var input = root.querySelector(".top-n");
  var shown = root.querySelector(".top-shown");
  function update(){
    var n = Number(input.value);
    root.querySelectorAll("[data-rank]").forEach(function(el){
      el.classList.toggle("hidden", Number(el.dataset.rank) >= n);
    });
    root.querySelectorAll(".cedge").forEach(function(e){
      e.classList.toggle("hidden", Number(e.dataset.rs) >= n || Number(e.dataset.rt) >= n);
    });
    shown.textContent = n;
  }
  input.addEventListener("input", update);
  update();
})();
"""

_JS = """
(function(){
  var root = document.getElementById("%(id)s");
  var svg = root.querySelector("svg");
  var tip = root.querySelector(".tip");
  var edges = Array.prototype.slice.call(svg.querySelectorAll(".edge"));
  var nodes = Array.prototype.slice.call(svg.querySelectorAll(".node"));
  var slider = root.querySelector(".prune");
  var hideConst = root.querySelector(".hide-const");
  var count = root.querySelector(".count");
  var byNode = {};
  edges.forEach(function(e){
    [e.dataset.s, e.dataset.t].forEach(function(n){ (byNode[n] = byNode[n] || []).push(e); });
  });
  function update(){
    var keep = Number(slider.value) / 100, hc = hideConst.checked, shown = 0;
    nodes.forEach(function(n){
      n.classList.toggle("hidden", hc && n.dataset.const === "1");
    });
    edges.forEach(function(e){
      var off = Number(e.dataset.q) > keep || (hc && e.dataset.c === "1");
      e.classList.toggle("hidden", off);
      if (!off) shown++;
    });
    count.textContent = shown + " of " + edges.length + " edges shown";
  }
  function focusNode(id){  // a link "page.html#node=<site>/<j>" opens with that node's details
    var n = nodes.filter(function(x){ return x.dataset.id === id; })[0];
    if (!n) return;
    var d = root.closest("details");
    if (d) d.open = true;
    var r = n.getBoundingClientRect();
    n.dispatchEvent(new MouseEvent("mouseenter", {clientX: r.left, clientY: r.top}));
  }
  slider.addEventListener("input", update);
  hideConst.addEventListener("change", update);
  nodes.forEach(function(n){
    n.addEventListener("mouseenter", function(ev){
      var mine = (byNode[n.dataset.id] || []).filter(function(e){
        return !e.classList.contains("hidden"); });
      mine.forEach(function(e){ e.classList.add("hl"); });
      n.classList.add("hl");
      var inc = mine.filter(function(e){ return e.dataset.t === n.dataset.id; })
        .sort(function(a, b){ return b.dataset.w - a.dataset.w; }).slice(0, 4);
      var out = mine.filter(function(e){ return e.dataset.s === n.dataset.id; })
        .sort(function(a, b){ return b.dataset.w - a.dataset.w; }).slice(0, 4);
      var text = n.dataset.site + " / direction " + n.dataset.index +
        "\\nΛ = " + Number(n.dataset.lambda).toPrecision(4) +
        (n.dataset.label ? "\\nlabel: " + n.dataset.label : "") +
        (n.dataset.module ? "\\nmodule " + n.dataset.module : "");
      if (inc.length) text += "\\nstrongest in: " + inc.map(function(e){
        return e.dataset.s + " (" + Number(e.dataset.w).toPrecision(3) + ")"; }).join(", ");
      if (out.length) text += "\\nstrongest out: " + out.map(function(e){
        return e.dataset.t + " (" + Number(e.dataset.w).toPrecision(3) + ")"; }).join(", ");
      tip.textContent = text;
      tip.style.display = "block";
      var box = root.getBoundingClientRect();
      tip.style.left = (ev.clientX - box.left + 12) + "px";
      tip.style.top = (ev.clientY - box.top + 12) + "px";
    });
    n.addEventListener("mouseleave", function(){
      edges.forEach(function(e){ e.classList.remove("hl"); });
      n.classList.remove("hl");
      tip.style.display = "none";
    });
  });
  update();
  var m = /#node=(.+)$/.exec(window.location.hash);
  if (m) focusNode(decodeURIComponent(m[1]));
})();
"""


def _viridis(t: float) -> str:
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    c = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1])]
    return "#" + "".join(f"{v:02x}" for v in c)


def _drawn_edges(graph, max_edges: int):
    """Per layer pair, the nonzero edges to draw: all of them when the whole graph has at most
    ``max_edges``, else the strongest ``max_edges // n_pairs`` of each pair."""
    pairs = graph.pairs()
    nonzero = sum(int((E > 0).sum()) for E in graph.edges.values())
    budget = None if nonzero <= max_edges else max(1, max_edges // max(1, len(pairs)))
    out = []
    for a, b in pairs:
        E = graph.edges[(a, b)].double()
        flat = E.flatten()
        order = flat.argsort(descending=True)
        n = int((flat > 0).sum())
        if budget is not None:
            n = min(n, budget)
        order = order[:n]
        top = float(flat[order[0]]) if n else 1.0
        width = E.shape[1]
        out.append((a, b, [(int(o // width), int(o % width), float(flat[o])) for o in order], top))
    return out, nonzero


def importance_scores(importance) -> dict | None:
    """``importance`` as site name → ``[k]``: a dict as given, or an attribution result
    (:class:`~tl_degen.patching.AttributionResult`: its per-direction sums, every site)."""
    if importance is None or isinstance(importance, dict):
        return importance
    if hasattr(importance, "attributions") and hasattr(importance, "per_direction"):
        return {name: importance.per_direction(name) for name in importance.attributions}
    raise TLDegenError("importance must be a dict site name → [k] scores or the result of "
                       f"tl_degen.attribution_patch, got {type(importance).__name__}")


def direction_scores(graph, site, importance):
    """How important each direction of ``site`` is: ``|importance[site.name]|`` when given
    (one value per direction), else ``|Λ|``; a float64 ``[k]`` tensor on the CPU."""
    b = graph.bases[site]
    if importance is not None and site.name in importance:
        score = importance[site.name].detach().double().abs().cpu()
        if score.shape != (b.k,):
            raise TLDegenError(
                f"importance[{site.name!r}] has shape {tuple(score.shape)}; "
                f"give one value per direction ({b.k})"
            )
        return score
    return b.eigenvalues.double().abs().cpu()


def ranked_directions(graph, site, importance) -> list[int]:
    """The site's directions, most important first (:func:`direction_scores`), the constant
    node left out."""
    const_j = graph.constant_node(site)
    score = direction_scores(graph, site, importance)
    return [int(j) for j in score.argsort(descending=True) if int(j) != const_j]


def _circuit_nodes(graph, site, top_nodes: int, importance) -> list[int]:
    """The site's ``top_nodes`` most important directions (constant node excluded): by
    ``|importance[site]|`` when given, else by Λ."""
    return ranked_directions(graph, site, importance)[:top_nodes]


def _fit(text: str, width: float, char_px: float = 6.6) -> str:
    """``text`` cut to what fits ``width`` pixels beside a node (12 px sans-serif), with an
    ellipsis; the whole label stays in the node's tooltip."""
    n = max(8, int((width - 60) / char_px))
    return text if len(text) <= n else text[:n - 1] + "…"


def circuit_svg(
    graph,
    *,
    top_nodes: int = 8,
    labels: dict[str, str] | None = None,
    importance: dict | None = None,
    uid: str | None = None,
) -> str:
    """The readable circuit: the ``top_nodes`` most important directions of every site (by Λ,
    or by ``|importance[site]|``, e.g. a per-direction attribution), labelled, and the edges
    among them, width and opacity by strength relative to the strongest drawn edge of their
    layer pair. A ``<div class="tld-circuit">``; it renders without scripts (a small script
    only adds the how-many control)."""
    if top_nodes < 1:
        raise TLDegenError("top_nodes must be at least 1")
    labels = labels or {}
    importance = importance_scores(importance)
    uid = uid or "tld-" + uuid.uuid4().hex[:10]
    sites = graph.sites
    chosen = {s: _circuit_nodes(graph, s, top_nodes, importance) for s in sites}
    n_max = max((len(v) for v in chosen.values()), default=1)
    col_w, top, row = 260, 50, 46
    W, H = col_w * len(sites) + 40, top + row * max(n_max, 1) + 10
    pos, rank, parts = {}, {}, []
    for c, s in enumerate(sites):
        b = graph.bases[s]
        x = 20 + col_w * c + 40
        lam = b.eigenvalues.double().abs()
        lmax = float(lam.max()) if len(lam) else 1.0
        parts.append(
            f'<text x="{x - 30:.1f}" y="20" font-weight="bold">{html.escape(s.name)}'
            f'</text><text x="{x - 30:.1f}" y="35" fill="#666">top {len(chosen[s])} '
            f"of {b.k} by {'importance' if importance and s.name in importance else 'Λ'}</text>"
        )
        for r, j in enumerate(chosen[s]):
            nid = graph.node_name(s, j)
            y = top + row * (r + 0.5)
            pos[nid], rank[nid] = (x, y), r
            lj = float(lam[j])
            rad = 4 + 8 * math.sqrt(lj / lmax) if lmax > 0 else 4
            label = labels.get(nid, "")
            text = _fit(f"#{j}" + (f" {label}" if label else ""), col_w)
            parts.append(
                f'<g data-rank="{r}"><circle class="cnode" cx="{x:.1f}" cy="{y:.1f}" '
                f'r="{rad:.1f}" fill="{_viridis(1 - r / max(n_max, 1))}" '
                f'data-id="{html.escape(nid)}"><title>{html.escape(s.name)} / {j}'
                f"{': ' + html.escape(label) if label else ''}; Λ {lj:.4g}</title></circle>"
                f'<text class="clabel" x="{x + 15:.1f}" y="{y - 2:.1f}">{html.escape(text)}'
                f'</text><text x="{x + 15:.1f}" y="{y + 11:.1f}" fill="#888" '
                f'font-size="10">Λ {lj:.3g}</text></g>'
            )
    edges = []
    for a, b in graph.pairs():
        E = graph.edges[(a, b)].double().cpu()
        share = importance is not None and b.name in importance
        if share:  # each edge's share of its target's |importance| (the target's edges split it)
            E = E / E.sum(1, keepdim=True).clamp_min(1e-300) * direction_scores(
                graph, b, importance)[:, None]
        what = "of its target's importance" if share else "of the edge strength"
        items = [(i, j, float(E[i, j])) for i in chosen[b] for j in chosen[a] if E[i, j] > 0]
        if not items:
            continue
        topw = max(w for _, _, w in items)
        for i, j, w in sorted(items, key=lambda t: t[2]):
            s_id, t_id = graph.node_name(a, j), graph.node_name(b, i)
            (x1, y1), (x2, y2) = pos[s_id], pos[t_id]
            rel = w / topw
            edges.append(
                f'<line class="cedge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                f'y2="{y2:.1f}" stroke-width="{0.5 + 5.5 * rel:.2f}" '
                f'stroke-opacity="{0.08 + 0.8 * rel:.2f}" data-s="{s_id}" '
                f'data-t="{t_id}" data-rs="{rank[s_id]}" data-rt="{rank[t_id]}">'
                f"<title>{s_id} → {t_id}: {w:.4g} {what} ({rel:.0%} of the "
                "strongest drawn)</title></line>"
            )
    return (
        f'<div class="tld-circuit" id="{uid}"><style>{_CSS}</style>'
        '<div class="controls" style="margin:6px 0">show the top <input class="top-n" '
        f'type="range" min="1" max="{n_max}" value="{n_max}"> <b class="top-shown">'
        f"{n_max}</b> directions per site; edge width by strength within its layer pair"
        f'</div><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-size="12"><g class="cedges">{"".join(edges)}</g>'
        f'<g class="cnodes">{"".join(parts)}</g></svg>'
        f"<script>{_CIRCUIT_JS % {'id': uid}}</script></div>"
    )


def graph_html(
    graph,
    *,
    labels: dict[str, str] | None = None,
    modules=None,
    max_edges: int = DEFAULT_MAX_EDGES,
    title: str = "Interaction graph",
    standalone: bool = True,
    height: int = 760,
    top_nodes: int | None = 8,
    importance: dict | None = None,
) -> str:
    """The graph as HTML: a complete page (``standalone``) or a ``<div>`` for a notebook.

    The page opens on the readable circuit (:func:`circuit_svg`: the ``top_nodes`` most
    important directions per site, labelled, and the edges among them); the whole graph,
    every node and drawn edge with hover details, is one click away below it
    (``top_nodes=None``: the whole graph alone, open).

    Args:
        graph: an :class:`~tl_degen.graph.InteractionGraph` (prune it first to choose what is
            drawn; at most ``max_edges`` edges are drawn, the strongest of each pair).
        labels: node id (``"site/j"``) → short text shown on hover (e.g. Fourier labels).
        modules: a :class:`~tl_degen.graph.Modules` to colour nodes by.
        max_edges: cap on drawn edges (keeps the page small).
        top_nodes: directions per site in the circuit view (``None``: no circuit view).
        importance: site name → ``[k]`` scores ranking that site's directions in the circuit
            view, or the result of :func:`~tl_degen.attribution_patch` itself (its
            per-direction attributions to your metric: the page opens on the metric's
            circuit); sites not given are ranked by Λ. An edge into a site with importance
            is drawn by its share of its target's |importance| (the target's incoming edge
            strengths, normalised, times it).

    Returns:
        HTML text with everything inlined.

    Examples:
        >>> page = viz.graph_html(graph.prune(mass=0.99), labels=viz.modadd_labels(model, bases),
        ...                       modules=graph.modules())
        >>> cell = viz.graph_html(graph, standalone=False)  # a <div> for a notebook
    """
    from tl_degen import checks
    from tl_degen.graph import InteractionGraph, Modules

    checks.instance("graph", graph, InteractionGraph, "interaction_graph")
    checks.integer("max_edges", max_edges, minimum=1)
    checks.integer("height", height, minimum=100)
    checks.integer("top_nodes", top_nodes, minimum=1, none=True)
    if labels is not None and not isinstance(labels, dict):
        raise TLDegenError(f"labels must be a dict of node id ('site/j') → text, got "
                           f"{type(labels).__name__}")
    if modules is not None:
        checks.instance("modules", modules, Modules, "graph.modules()")
    if importance is not None and isinstance(importance, dict) and any(
            not hasattr(v, "detach") for v in importance.values()):
        raise TLDegenError("importance must map site names to [k] tensors of scores, or be "
                           "an AttributionResult")
    labels = labels or {}
    membership = modules.membership if modules is not None else {}
    uid = "tld-" + uuid.uuid4().hex[:10]
    sites = graph.sites
    col_w, top, bottom = 230, 50, 20
    W = col_w * len(sites) + 40
    drawn, nonzero = _drawn_edges(graph, max_edges)
    pos: dict[str, tuple[float, float]] = {}
    node_svg = []
    for c, s in enumerate(sites):
        b = graph.bases[s]
        lam = b.eigenvalues.double().abs()
        lmax = float(lam.max()) if len(lam) else 1.0
        x = 20 + col_w * c + col_w / 2
        step = (height - top - bottom) / max(b.k, 1)
        const_j = graph.constant_node(s)
        lo = math.log10(max(float(lam[lam > 0].min()) if (lam > 0).any() else 1.0, 1e-300))
        hi = math.log10(max(lmax, 1e-300))
        node_svg.append(
            f'<text x="{x:.1f}" y="20" text-anchor="middle" font-weight="bold">'
            f'{html.escape(s.name)}</text><text x="{x:.1f}" y="35" '
            f'text-anchor="middle" fill="#666">{b.k} directions ({b.method})</text>'
        )
        for j in range(b.k):
            nid = graph.node_name(s, j)
            y = top + step * (j + 0.5)
            pos[nid] = (x, y)
            lj = float(lam[j])
            r_max = max(2.0, min(9.0, 0.48 * step))  # neighbours must not overlap
            r = 1.5 + (r_max - 1.5) * math.sqrt(lj / lmax) if lmax > 0 else 1.5
            if nid in membership:
                colour = MODULE_COLOURS[membership[nid] % len(MODULE_COLOURS)]
            elif j == const_j:
                colour = "#bbbbbb"
            else:
                t = (math.log10(max(lj, 1e-300)) - lo) / (hi - lo) if hi > lo else 1.0
                colour = _viridis(t)
            is_const = j == const_j
            label = labels.get(nid, "constant" if is_const else "")
            mod = membership.get(nid)
            tip = f"{s.name} / {j}: Λ={lj:.4g}" + (f", {label}" if label else "")
            node_svg.append(
                f'<circle class="node" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}" '
                f'data-id="{html.escape(nid)}" data-site="{html.escape(s.name)}" '
                f'data-index="{j}" data-lambda="{lj:.6g}" data-const="{int(is_const)}" '
                f'data-label="{html.escape(label)}"'
                + (f' data-module="{mod}"' if mod is not None else "")
                + f"><title>{html.escape(tip)}</title></circle>"
            )
    edge_svg = []
    for a, b, items, topw in drawn:
        const_in = graph.constant_node(a)
        n = len(items)
        for rank, (i, j, w) in enumerate(items):
            s_id, t_id = graph.node_name(a, j), graph.node_name(b, i)
            (x1, y1), (x2, y2) = pos[s_id], pos[t_id]
            rel = w / topw if topw > 0 else 0.0
            edge_svg.append(
                f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                f'stroke-width="{0.3 + 2.7 * math.sqrt(rel):.2f}" '
                f'stroke-opacity="{0.04 + 0.66 * rel:.2f}" data-s="{s_id}" '
                f'data-t="{t_id}" data-w="{w:.4g}" data-q="{(rank + 1) / n:.4f}" '
                f'data-c="{int(j == const_in)}"/>'
            )
    shown = sum(len(d[2]) for d in drawn)
    note = f"{shown} edges drawn" + (
        f" (the strongest {shown} of {nonzero} nonzero; prune the "
        "graph or raise max_edges for more)"
        if shown < nonzero
        else ""
    )
    body = (
        f'<div class="tld-graph" id="{uid}"><style>{_CSS}</style>'
        f'<div class="title" style="font-size:15px;font-weight:bold">{html.escape(title)}'
        f'</div><div class="note" style="color:#666">{html.escape(note)}; node size √Λ, '
        f"colour {'module' if membership else 'log Λ'}; hover a node for details</div>"
        '<div class="controls"><label>strongest <input class="prune" type="range" '
        'min="1" max="100" value="100"> % of edges per layer pair</label>'
        '<label><input class="hide-const" type="checkbox"> hide constant nodes</label>'
        '<span class="count"></span></div>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
        f'viewBox="0 0 {W} {height}" font-size="11"><g class="edges">{"".join(edge_svg)}'
        f'</g><g class="nodes">{"".join(node_svg)}</g></svg><div class="tip"></div>'
        f"<script>{_JS % {'id': uid}}</script></div>"
    )
    if top_nodes is not None:
        n_nodes = sum(graph.bases[s].k for s in sites)
        body = (
            f'<div class="tld-title" style="font:bold 15px sans-serif">'
            f"{html.escape(title)}</div>"
            + circuit_svg(
                graph, top_nodes=top_nodes, labels=labels, importance=importance, uid=uid + "-c"
            )
            + f'<details class="tld-all"><summary>The whole graph: {n_nodes} nodes, '
            f"{shown} edges drawn (hover a node for details)</summary>{body}</details>"
        )
    if not standalone:
        return body
    meta = html.escape(json.dumps(graph.n_edges()))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><meta name='tl-degen-edges' content='{meta}'>"
        f"</head><body>{body}</body></html>"
    )


def save_graph_page(graph, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`graph_html` to ``path`` atomically (no half-written file on error),
    creating its folder as ``BasisSet.save`` does.

    Examples:
        >>> pruned = graph.prune(mass=0.99)
        >>> viz.save_graph_page(pruned, "graph.html", labels=viz.modadd_labels(model, bases),
        ...                     modules=pruned.modules(), title="modadd, layer 0")
    """
    path = output_path(path, "graph page")
    return write_text_atomic(path, graph_html(graph, **kwargs), "graph page")
