"""Bases and graph of many sites in one call, with one progress bar and a resumable folder.

:func:`fit_and_graph` is :func:`~tl_degen.fit_bases` followed by
:func:`~tl_degen.interaction_graph` on the same tokens, for runs long enough to want one ETA
and to survive an interruption: a whole model's cuts (:func:`tl_degen.every_layer`), a
language model at scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from tl_degen import checks
from tl_degen.adapters import get_adapter
from tl_degen.basis import Threshold
from tl_degen.basis_set import BasisSet
from tl_degen.distributed import tokens_digest, weights_digest
from tl_degen.errors import CheckpointError, TLDegenError
from tl_degen.fitting import fit_bases, token_batches
from tl_degen.graph import InteractionGraph, interaction_graph
from tl_degen.progress import RunBar
from tl_degen.sites import Site, parse_sites

__all__ = ["fit_and_graph", "FitAndGraph"]


class FitAndGraph(NamedTuple):
    """What :func:`fit_and_graph` returns."""

    bases: BasisSet
    graph: InteractionGraph


def fit_and_graph(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    sites: Sequence[str | Site],
    *,
    folder: str | os.PathLike | None = None,
    method: str = "lib",
    threshold: float | Threshold = 1e-13,
    integration: str = "gradient",
    n_alpha: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    n_probes: int | None = None,
    probe_groups: int = 4,
    target_error: float | None = None,
    max_probes: int | None = None,
    seed: int = 0,
    closed_form: bool = True,
    route: str | None = None,
    progress: bool = True,
    checkpoint_every: int = 10,
) -> FitAndGraph:
    """:func:`~tl_degen.fit_bases` then :func:`~tl_degen.interaction_graph`, under one
    progress bar with one ETA, resumable from ``folder``.

    Args:
        model, tokens, sites: as in :func:`~tl_degen.fit_bases`; e.g.
            ``tl_degen.every_layer(model)`` for every layer of the model.
        folder: where the run keeps its state: ``fit.ckpt.safetensors`` (the fit's
            accumulators, every ``checkpoint_every`` batches), then ``bases.safetensors``
            (the fitted bases), ``graph.ckpt.safetensors`` (each finished pair's edges) and
            at the end ``graph.safetensors``. Run the same call again after an interruption
            and it goes on from there: a finished fit is loaded, not redone; a finished
            graph is loaded. ``None``: nothing is written.
        method: as in :func:`~tl_degen.fit_bases`, like ``threshold``, ``target_error``,
            ``max_probes`` and ``checkpoint_every`` (the fit only) and ``integration``,
            ``n_alpha``, ``batch_size``, ``dtype``, ``n_probes``, ``probe_groups``, ``seed``
            and ``closed_form`` (the fit and the graph).
        route: as in :func:`~tl_degen.interaction_graph`.
        progress: one bar over the fit's stages and the graph's pairs, counted in batches.

    Returns:
        :class:`FitAndGraph` ``(bases, graph)``. ``graph.config["edge_seconds"]`` holds the
        time of each pair.

    Examples:
        >>> bases, graph = tl_degen.fit_and_graph(model, tokens, tl_degen.every_layer(model),
        ...                                       n_probes=32, dtype=torch.float32,
        ...                                       folder="gpt2_run")
    """
    adapter = get_adapter(model)
    site_list = parse_sites(sites)
    dtype = checks.floating_dtype("dtype", dtype, statistics=True)
    checks.boolean("progress", progress)
    paths, created = None, False
    if folder is not None:
        if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
            raise CheckpointError(f"folder must be a folder name (str or Path), got {folder!r}")
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"folder={str(folder)!r} is a file; give a folder for the "
                                  "run's state")
        created = not folder.exists()
        paths = {name: folder / f"{name}.safetensors"
                 for name in ("fit.ckpt", "bases", "graph.ckpt", "graph")}
    fit_kwargs = dict(method=method, threshold=threshold, integration=integration,
                      n_alpha=n_alpha, batch_size=batch_size, dtype=dtype, n_probes=n_probes,
                      probe_groups=probe_groups, target_error=target_error,
                      max_probes=max_probes, seed=seed, closed_form=closed_form)
    graph_kwargs = dict(integration=integration, n_alpha=n_alpha, batch_size=batch_size,
                        dtype=dtype, n_probes=n_probes, probe_groups=probe_groups, seed=seed,
                        closed_form=closed_form, route=route)
    itemsize = torch.finfo(dtype or adapter.dtype).bits // 8
    batches = token_batches(tokens, batch_size, adapter, itemsize)
    n_batches = len(batches)
    if paths is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _claim(folder, {"sites": [s.name for s in site_list], "route": route,
                        **{k: str(v) for k, v in fit_kwargs.items()},
                        "weights": weights_digest(model), "tokens": tokens_digest(batches)})
    try:
        return _run(model, tokens, site_list, paths, n_batches, fit_kwargs, graph_kwargs,
                    method, progress, checkpoint_every)
    except TLDegenError:
        if paths is not None and not any(paths[k].exists() for k in ("fit.ckpt", "bases")):
            (folder / "run.json").unlink(missing_ok=True)  # refused before any work: leave
            if created and not any(folder.iterdir()):   # no trace of the call
                folder.rmdir()
        raise


def _run(model, tokens, site_list: list[Site], paths: dict | None, n_batches: int,
         fit_kwargs: dict, graph_kwargs: dict, method: str, progress: bool,
         checkpoint_every: int) -> FitAndGraph:
    """The fit and the graph of :func:`fit_and_graph`, under one bar, kept in ``paths``."""
    fitted = 1 + (sum(s.kind != "logits" for s in site_list) if method == "lib" else 0)
    total = n_batches * (fitted + len(site_list) - 1)
    with RunBar(total, desc=f"{len(site_list)} sites", disable=not progress) as bar:
        if paths is not None and paths["bases"].exists():
            bases = BasisSet.load(paths["bases"], model)
            if [s.name for s in bases.sites] != [s.name for s in site_list]:
                raise CheckpointError(
                    f"{paths['bases']} holds bases of other sites ({bases.sites[0].name}, ...)"
                    "; give another folder, or delete it to fit again")
            bar.update(n_batches * fitted)
        else:
            bases = fit_bases(model, tokens, site_list, progress=bar,
                              checkpoint=None if paths is None else paths["fit.ckpt"],
                              checkpoint_every=checkpoint_every, **fit_kwargs)
            if paths is not None:
                bases.save(paths["bases"])
        if paths is not None and paths["graph"].exists():
            graph = InteractionGraph.load(paths["graph"], model)
            bar.update(n_batches * (len(site_list) - 1))
        else:
            graph = interaction_graph(model, tokens, bases, progress=bar,
                                      checkpoint=None if paths is None else paths["graph.ckpt"],
                                      **graph_kwargs)
            if paths is not None:
                graph.save(paths["graph"])
    return FitAndGraph(bases, graph)


def _claim(folder: Path, run: dict) -> None:
    """Write ``run.json`` (what the run is) into ``folder``, or check that the one there is
    this run: a folder of another run (other sites, settings, weights or tokens) is refused,
    never resumed."""
    path = folder / "run.json"
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = {}
        differ = sorted(k for k in set(theirs) | set(run) if theirs.get(k) != run.get(k))
        if differ:
            raise CheckpointError(
                f"{folder} holds another run (it differs in {', '.join(differ)}); resume with "
                "the same model, tokens and arguments, or give another folder")
        return
    leftovers = [p.name for p in folder.iterdir() if p.name != "run.json"]
    if leftovers:
        raise CheckpointError(f"{folder} is not empty ({', '.join(sorted(leftovers)[:3])}) and "
                              "holds no run.json; give a new or empty folder")
    tmp = path.with_name(".run.json.tmp")
    tmp.write_text(json.dumps(run, indent=1, sort_keys=True))
    os.replace(tmp, path)
