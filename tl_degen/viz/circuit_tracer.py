"""Export an interaction graph in circuit-tracer's graph format, the JSON that its bundled
frontend (``circuit_tracer.frontend.serve``) and Neuronpedia's graph viewer load.

circuit-tracer (https://github.com/decoderesearch/circuit-tracer, schema of version 0.5 in
``circuit_tracer/frontend/graph_models.py``) draws an attribution graph as rows of layers
over columns of prompt positions. An interaction graph maps onto it as follows:

* **Layers.** The first site is the input row (``layer "E"``, drawn as "Emb"); site ``i``
  (``i ≥ 1``) is ``layer str(i - 1)`` (drawn as ``L{i-1}``); when the last site is the logits
  it becomes the logit row (``feature_type "logit"``, ``layer str(n_sites - 2)``, one above
  the last direction layer, where the frontend puts logits anyway).
* **Nodes.** Direction ``j`` of a site is one node: ``feature`` is the Cantor pairing of
  (site index, ``j``) as in circuit-tracer's schema version 1 (the frontend unpairs it and
  shows ``L{layer}/{j}``), ``node_id`` ``"{layer}_{j}_{ctx}"``. Logit ``j`` keeps
  ``feature = j`` (its vocabulary index) and ``node_id "{layer}_{j}_{ctx}"``. Every node
  sits at the last prompt position (``ctx_idx = n_pos - 1``): a LIB direction is shared by
  all positions its site covers. ``clerp`` (the text the frontend shows) is the node's label
  (``labels``, e.g. :func:`~tl_degen.viz.modadd_labels`) followed by ``[site/j]``; for logits
  it is ``Output "<label or j>" (p=<share>)`` where ``p`` is the node's share of its site's
  score (not a probability). ``activation`` is Λ; ``influence`` is the cumulative share of
  the site's score up to and including the node, in descending order (small = important, as
  in circuit-tracer, so ``node_threshold`` prunes the same way). The score is
  ``|importance[site]|`` when given, else Λ. Feature types: ``"cross layer transcoder"``
  for directions (the frontend's ordinary feature nodes; ``"embedding"`` would replace the
  label by the prompt token), ``"logit"`` for logits.
* **Links.** One per nonzero edge, ``source`` → ``target``, ``weight`` = the edge strength
  ``E[i, j]`` (non-negative; prune the graph first to choose what is exported).
* **The circuit.** ``qParams.pinnedIds`` holds the ``top_nodes`` most important directions
  of every site (the graph page's circuit view), which the frontend's subgraph panel draws;
  ``qParams.supernodes`` holds one group ``[label, *node_ids]`` per Leiden module with at
  least two pinned members (``modules``).

The folder written holds ``<slug>.json`` and ``graph-metadata.json`` (merged with any graphs
already listed), the layout circuit-tracer's ``serve(data_dir=folder)`` reads::

    graph.prune(mass=0.99).to_circuit_tracer("ct_graphs", slug="modadd",
                                             labels=viz.modadd_labels(model, bases))
    from circuit_tracer.frontend.local_server import serve
    server = serve(data_dir="ct_graphs")  # open http://localhost:8032/index.html
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tl_degen.errors import ArgumentError, TLDegenError
from tl_degen.io import output_path, write_text_atomic
from tl_degen.viz.graph_page import direction_scores, importance_scores, ranked_directions

__all__ = ["circuit_tracer_json", "save_circuit_tracer", "CIRCUIT_TRACER_NODE_FIELDS"]

#: The fields of a node in circuit-tracer 0.5's ``graph_models.Node``.
CIRCUIT_TRACER_NODE_FIELDS = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def circuit_tracer_json(
    graph,
    *,
    slug: str = "tl-degen",
    labels: dict[str, str] | None = None,
    modules=None,
    top_nodes: int = 8,
    importance: dict | None = None,
    prompt_tokens: list[str] | None = None,
    prompt: str | None = None,
    scan: str = "tl-degen",
    node_threshold: float | None = None,
) -> dict:
    """The graph as a circuit-tracer graph (a dict of ``metadata``, ``qParams``, ``nodes``,
    ``links``; the mapping is in this module's docstring).

    Args:
        graph: an :class:`~tl_degen.graph.InteractionGraph` (prune it first).
        slug: the graph's name in the frontend (letters, digits, ``-`` and ``_``).
        labels: node id (``"site/j"``) → label, shown as the node's text.
        modules: a :class:`~tl_degen.graph.Modules`; its modules become supernodes.
        top_nodes: directions per site pinned (the subgraph the frontend draws).
        importance: site name → ``[k]`` scores ranking directions (default Λ), or the
            result of :func:`~tl_degen.attribution_patch`.
        prompt_tokens: text of each position (default ``"pos0"``, ``"pos1"``, …).
        prompt: the prompt shown in the graph list (default the tokens joined).
        scan: the frontend's name for the feature set.
        node_threshold: when set, the frontend shows a pruning slider over ``influence``.

    Examples:
        >>> data = viz.circuit_tracer_json(graph.prune(mass=0.99), slug="modadd",
        ...                                prompt_tokens=["a", "b", "="])
        >>> data["qParams"]["pinnedIds"][:2], len(data["links"])
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", slug):
        raise TLDegenError(f"slug {slug!r}: use letters, digits, '-' and '_' only")
    if top_nodes < 0:
        raise TLDegenError("top_nodes must be non-negative")
    labels = labels or {}
    importance = importance_scores(importance)
    sites = graph.sites
    from tl_degen import checks
    from tl_degen.graph import InteractionGraph, Modules

    checks.instance("graph", graph, InteractionGraph, "interaction_graph")
    checks.integer("top_nodes", top_nodes, minimum=1)
    if labels is not None and not isinstance(labels, dict):
        raise ArgumentError(f"labels must be a dict of node id ('site/j') → text, got "
                            f"{type(labels).__name__}")
    if modules is not None:
        checks.instance("modules", modules, Modules, "graph.modules()")
    checks.number("node_threshold", node_threshold, minimum=0, none=True)
    n_pos = int(graph.config.get("n_pos") or 1)
    tokens = list(prompt_tokens) if prompt_tokens is not None else [f"pos{i}" for i in range(n_pos)]
    if len(tokens) < 2:  # the frontend drops a feature present at more than 2/3 of positions
        tokens = ["·"] * (2 - len(tokens)) + tokens
    ctx = len(tokens) - 1
    logits_last = sites[-1].kind == "logits"
    ids: dict[str, str] = {}
    nodes = []
    for i, site in enumerate(sites):
        b = graph.bases[site]
        is_logit = logits_last and i == len(sites) - 1
        layer = "E" if i == 0 else str(i - 1)
        score = direction_scores(graph, site, importance)
        const_j = graph.constant_node(site)
        ranked = ranked_directions(graph, site, importance)
        total = float(score[ranked].sum()) if ranked else 0.0
        influence, acc = {}, 0.0
        for j in ranked:
            acc += float(score[j])
            influence[j] = acc / total if total > 0 else 1.0
        for j in range(b.k):
            name = graph.node_name(site, j)
            label = labels.get(name, "constant" if j == const_j else "")
            share = float(score[j]) / total if total > 0 and j != const_j else 0.0
            if is_logit:
                node = {
                    "node_id": f"{layer}_{j}_{ctx}",
                    "feature": j,
                    "feature_type": "logit",
                    "jsNodeId": f"L_{j}-{ctx}",
                    "token_prob": share,
                    "clerp": f'Output "{label or j}" (p={share:.3f})',
                }
            else:
                node = {
                    "node_id": f"{layer}_{j}_{ctx}",
                    "feature": _cantor(i, j),
                    "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{j}-0",
                    "token_prob": 0.0,
                    "clerp": (f"{label} " if label else "") + f"[{name}]",
                }
            node.update(
                layer=layer,
                ctx_idx=ctx,
                is_target_logit=False,
                run_idx=0,
                reverse_ctx_idx=0,
                influence=influence.get(j),
                activation=float(b.eigenvalues[j]),
            )
            ids[name] = node["node_id"]
            nodes.append({k: node[k] for k in CIRCUIT_TRACER_NODE_FIELDS})
    links = []
    for a, b in graph.pairs():
        E = graph.edges[(a, b)].double().cpu()
        for i, j in (E > 0).nonzero().tolist():
            links.append(
                {
                    "source": ids[graph.node_name(a, j)],
                    "target": ids[graph.node_name(b, i)],
                    "weight": float(E[i, j]),
                }
            )
    pinned = [
        ids[graph.node_name(s, j)]
        for s in sites
        for j in ranked_directions(graph, s, importance)[:top_nodes]
    ]
    supernodes = []
    if modules is not None:
        pinned_set = set(pinned)
        groups: dict[int, list[str]] = {}
        for name, m in modules.membership.items():
            if name in ids and ids[name] in pinned_set:
                groups.setdefault(m, []).append(name)
        for m in sorted(groups):
            members = sorted(groups[m], key=lambda n: pinned.index(ids[n]))
            if len(members) < 2:
                continue
            # the frontend URI-decodes the supernodes it reads back: no bare "%" in labels
            first = labels.get(members[0], members[0]).replace("%", " pct")
            supernodes.append([f"module {m}: {first}", *(ids[n] for n in members)])
    meta = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": tokens,
        "prompt": prompt if prompt is not None else " ".join(tokens),
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {
        "pinnedIds": pinned,
        "supernodes": supernodes,
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def save_circuit_tracer(
    graph, folder: str | os.PathLike, *, slug: str = "tl-degen", **kwargs
) -> Path:
    """Write :func:`circuit_tracer_json` as ``folder/<slug>.json`` and list it in
    ``folder/graph-metadata.json`` (other graphs listed there are kept), both atomically;
    ``circuit_tracer.frontend.serve(data_dir=folder)`` then shows it. Returns the graph file.

    Examples:
        >>> path = viz.save_circuit_tracer(graph.prune(mass=0.99), "ct_graphs", slug="modadd",
        ...                                labels=viz.modadd_labels(model, bases),
        ...                                modules=graph.modules())
    """
    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
        raise ArgumentError(f"folder must be a folder name (str or Path), got {folder!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ArgumentError(f"{folder} is a file; give a folder for circuit-tracer's graphs")
    path = output_path(folder / f"{slug}.json", "circuit-tracer graph")
    index = folder / "graph-metadata.json"
    listed = {"graphs": []}
    if index.exists():
        try:
            listed = json.loads(index.read_text(encoding="utf-8"))
            assert isinstance(listed, dict) and isinstance(listed.get("graphs", []), list)
            assert all(isinstance(g, dict) for g in listed.get("graphs", []))
        except (ValueError, AssertionError):
            raise ArgumentError(f"{index} is not circuit-tracer's graph list (a JSON object "
                                "with a list of graphs); move it away or give another "
                                "folder") from None
    data = circuit_tracer_json(graph, slug=slug, **kwargs)
    write_text_atomic(path, json.dumps(data), "circuit-tracer graph")
    listed["graphs"] = [g for g in listed.get("graphs", []) if g.get("slug") != slug]
    listed["graphs"].append(data["metadata"])
    write_text_atomic(index, json.dumps(listed, indent=1), "circuit-tracer graph list")
    return path
