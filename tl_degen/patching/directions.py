"""Patching basis directions: :func:`patch_directions`, :class:`PatchResult`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.errors import DataError, LongRunWarning, SiteError, TLDegenError
from tl_degen.io import Serialisable, as_tensor
from tl_degen.model_state import prepared
from tl_degen.patching.common import (
    Directions,
    Metric,
    _check_finite,
    _check_mode,
    _groups,
    _metric,
    _pair_tokens,
    _positions,
    lookup_basis,
)
from tl_degen.sites import Site


# ---------------------------------------------------------------------------- patching
@dataclass
class PatchResult(Serialisable):
    """The metric after patching basis directions of one site.

    Attributes:
        site, method, mode: what was patched, in which basis, in which direction.
        groups: the patched direction sets (indices into the basis' columns).
        labels: one printable label per group.
        values: ``[n_groups]`` mean metric with each group patched.
        per_example: ``[n_groups, batch]`` the metric per example (or the scalar repeated).
        clean, corrupted: the unpatched runs' mean metric.
        site_value: the whole site patched (TransformerLens-style component patch).
        all_value: every kept direction patched together.
        positions: the token positions patched.

    ``to_dict()`` gives the constructor's arguments: ``{"site": name, "method", "mode",
    "groups", "labels", "values": tensor, "per_example": tensor, "clean", "corrupted",
    "site_value", "all_value", "positions"}``; ``from_dict`` / ``save`` / ``load`` round-trip
    it (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is the same with the tensors as
    lists (JSON), which ``from_dict`` reads too.

    Examples:
        >>> clean, corrupted, logit_diff = modadd.patching_pairs(500)
        >>> res = tl_degen.patch_directions(model, clean, corrupted, bases, "resid_mid.0:last",
        ...                                 logit_diff)
        >>> res.top(5), res.recovered()[:5], res.all_value - res.site_value
    """

    site: Site
    method: str
    mode: str
    groups: list[list[int]]
    labels: list[str]
    values: Float[Tensor, " n_groups"]
    per_example: Float[Tensor, "n_groups batch"]
    clean: float
    corrupted: float
    site_value: float
    all_value: float
    positions: list[int] = field(default_factory=list)

    @property
    def base(self) -> float:
        """The metric of the unpatched run that was patched into."""
        return self.corrupted if self.mode == "denoising" else self.clean

    @property
    def effects(self) -> Float[Tensor, " n_groups"]:
        """``values − base``: what each patch changed."""
        return self.values - self.base

    def recovered(self) -> Float[Tensor, " n_groups"]:
        """``(values − corrupted) / (clean − corrupted)``: 1 means the clean metric, 0 the
        corrupted one (for denoising, the fraction of the clean behaviour restored)."""
        gap = self.clean - self.corrupted
        if gap == 0:
            raise DataError("clean and corrupted runs have the same metric; nothing to recover")
        return (self.values - self.corrupted) / gap

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"site": self.site.name, "method": self.method, "mode": self.mode,
                "groups": [list(g) for g in self.groups], "labels": list(self.labels),
                "values": self.values, "per_example": self.per_example, "clean": self.clean,
                "corrupted": self.corrupted, "site_value": self.site_value,
                "all_value": self.all_value, "positions": list(self.positions)}

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable); :meth:`from_dict` rebuilds the result."""
        return {"site": self.site.name, "method": self.method, "mode": self.mode,
                "groups": self.groups, "labels": self.labels, "values": self.values.tolist(),
                "per_example": self.per_example.tolist(), "clean": self.clean,
                "corrupted": self.corrupted, "site_value": self.site_value,
                "all_value": self.all_value, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> PatchResult:
        """Rebuild from :meth:`to_dict` (or :meth:`as_dict`)."""
        from tl_degen import checks

        checks.fields("PatchResult.from_dict", d, (
            "site", "method", "mode", "groups", "labels", "values", "per_example", "clean",
            "corrupted", "site_value", "all_value"))
        return cls(Site.parse(d["site"]), d["method"], d["mode"],
                   [list(g) for g in d["groups"]], list(d["labels"]), as_tensor(d["values"]),
                   as_tensor(d["per_example"]), d["clean"], d["corrupted"], d["site_value"],
                   d["all_value"], list(d.get("positions", [])))

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` groups with the largest absolute effect, as ``(label, effect)``."""
        from tl_degen import checks

        n = checks.integer("n", n, minimum=1)
        order = self.effects.abs().argsort(descending=True)[:n]
        return [(self.labels[i], float(self.effects[i])) for i in order]

    def __repr__(self) -> str:
        rows = "\n".join(f"    {lab:>10s}  {eff:+.5g}" for lab, eff in self.top(5))
        return (f"PatchResult({self.site.name!r}, method={self.method!r}, mode={self.mode!r}, "
                f"{len(self.groups)} groups, clean={self.clean:.5g}, "
                f"corrupted={self.corrupted:.5g}, whole site={self.site_value:.5g}, "
                f"all kept directions={self.all_value:.5g})\n  largest effects:\n{rows}")


#: ``patch_directions`` with every direction alone warns, before it starts, when the run is
#: estimated to take longer than this many seconds.
LONG_RUN_SECONDS = 60.0


def _announce_cost(site: Site, n_groups: int, per_call: int, seconds_for_two: float) -> None:
    """Warn before a long default run (every direction alone): what it costs, and the fast
    way (attribution first, then the top directions)."""
    passes = -(-n_groups // per_call)
    per_pass = min(per_call, n_groups) * seconds_for_two / 2  # time grows with stacked rows
    estimate = passes * per_pass
    if estimate <= LONG_RUN_SECONDS:
        return
    warnings.warn(
        f"patching each of the {n_groups} directions of {site.name} alone takes about "
        f"{estimate / 60:.0f} min here ({passes} forward passes of ~{per_pass:.1f} s); "
        f"tl_degen.attribution_patch ranks them all in one pass: patch its top ones with "
        f"directions=attribution.top({site.name!r}, 16)", LongRunWarning, stacklevel=4)


def patch_directions(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    bases: BasisSet | InteractionBasis,
    site: str | Site,
    metric: Metric,
    *,
    directions: Directions = None,
    positions: int | Sequence[int] | None = None,
    mode: str = "denoising",
    dtype: torch.dtype | None = None,
    rows_per_pass: int = 4096,
    progress: bool = True,
) -> PatchResult:
    """Activation patching of single basis directions (or groups) at one site.

    Patches share forward passes (stacked along the batch). On a ``HookedTransformer`` every
    pass starts at the site's block from the target's cached residual stream
    (``start_at_layer``), so the blocks upstream of the site run once, not once per patch;
    on a TransformerLens 4 ``TransformerBridge`` too (those blocks are stood in for while
    resumed); a TransformerLens 3 bridge runs from the embedding.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (the one the bases fit).
        clean_tokens, corrupted_tokens: ``[batch, pos]`` paired prompts.
        bases: a :class:`BasisSet` containing ``site`` (LIB, PCA or neuron), or one basis.
        site: e.g. ``"resid_mid.0:last"``; must match a basis' site, positions included.
        metric: function of the logits ``[batch, pos, d_vocab]`` → scalar or ``[batch]``.
        directions: ``None`` (each direction alone), a list of indices (each alone), or a list
            of lists (each a group patched together), e.g. ``[list(range(n)) for n in ...]``
            for cumulative patching. ``None`` on a large site (hundreds of directions at
            every position of a language model) can take many minutes: it warns first
            (:class:`~tl_degen.errors.LongRunWarning`, above :data:`LONG_RUN_SECONDS`) with the
            estimate; ``attribution_patch(...).top(site, n)`` picks the directions worth it.
        positions: token positions to patch (default: all of the site's positions).
        mode: ``"denoising"`` (run corrupted, patch in clean) or ``"noising"``.
        dtype: run the model in this dtype (default: its own).
        rows_per_pass: several patches share one forward pass, stacked along the batch, up to
            about this many token rows (``patches × batch × pos``); lower it to save memory.

    Returns:
        A :class:`PatchResult`.

    Examples:
        >>> res = tl_degen.patch_directions(model, clean, corrupt, bases, "resid_mid.0:last",
        ...                                 logit_diff, directions=[[0, 1, 2], [3]])
        >>> res.recovered()
    """
    _check_mode(mode)
    if isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int) or rows_per_pass < 1:
        raise TLDegenError(f"rows_per_pass must be a positive integer, got {rows_per_pass!r}")
    basis = lookup_basis(bases, site, model)
    site = basis.site
    if site.kind == "logits":
        raise SiteError("patching the logits is the output itself; choose an earlier site")
    adapter = get_adapter(model)
    clean, corrupted = _pair_tokens(adapter, clean_tokens, corrupted_tokens)
    pos_idx = _positions(site, positions, clean.shape[1])
    groups, labels = _groups(directions, basis.k)
    runs = patch_runs(model, clean, corrupted, basis, _metric(metric), groups, pos_idx,
                      mode=mode, dtype=dtype, rows_per_pass=rows_per_pass, progress=progress,
                      announce=directions is None)
    per_example = runs.groups
    site_pos = site.resolve_positions(clean.shape[1])
    return PatchResult(site, basis.method, mode, groups, labels, per_example.mean(1),
                       per_example, float(runs.clean.mean()), float(runs.corrupted.mean()),
                       float(runs.site.mean()), float(runs.all.mean()),
                       [site_pos[i] for i in pos_idx])


class PatchRuns(NamedTuple):
    """Per-example metric values of one batch of patches (:func:`patch_runs`)."""

    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    site: Float[Tensor, " batch"]  # the whole site patched
    all: Float[Tensor, " batch"]  # every kept direction patched together
    groups: Float[Tensor, "n_groups batch"]
    moved: float  # the largest |source − target| at the patched positions (0: nothing to patch)


class PairReads(NamedTuple):
    """The clean and corrupted runs, each run once (:func:`read_pair`): the metric per
    example and the activations ``[batch, n_site_positions, d_site + 1]`` of each site."""

    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    x_clean: dict[Site, Tensor]
    x_corrupted: dict[Site, Tensor]


def read_pair(adapter, clean: Tensor, corrupted: Tensor, sites: Sequence[Site],
              fn: Callable[[Tensor], Tensor]) -> PairReads:
    """Run the clean and the corrupted prompts once each, reading every site and the
    logits in the same pass; the metric must be finite on both, and so the activations.
    Call inside ``prepared(model, dtype)`` and ``torch.no_grad()``."""
    values, xs = [], []
    for name, tokens in (("clean", clean), ("corrupted", corrupted)):
        *read, logits = adapter.read_sites(tokens, [*sites, Site("logits")])
        value = fn(logits)
        del logits
        if not torch.isfinite(value).all():
            raise DataError(f"the metric returned NaN or Inf on the {name} run; check it "
                            "on the model's logits")
        values.append(value)
        xs.append(dict(zip(sites, read)))
    for site in sites:
        _check_finite(xs[0][site], xs[1][site], site=site)
    return PairReads(values[0], values[1], xs[0], xs[1])


def patch_runs(model, clean: Tensor, corrupted: Tensor, basis: InteractionBasis,
               fn: Callable[[Tensor], Tensor], groups: list[list[int]], pos_idx: list[int], *,
               mode: str, dtype: torch.dtype | None, rows_per_pass: int, progress: bool,
               announce: bool = False, with_all: bool = True,
               reads: PairReads | None = None) -> PatchRuns:
    """The runs behind :func:`patch_directions`, on validated arguments: the clean and
    corrupted runs, the whole site and every kept direction patched, and each group of
    directions patched, all per example (CPU, float64). Patches share forward passes, stacked
    along the batch; on a ``HookedTransformer`` the blocks before the site run once.
    ``with_all=False`` skips the every-kept-direction run (``all`` is then NaN), for callers
    whose groups include it. ``reads``: the clean and corrupted runs already read
    (:func:`read_pair`, same ``dtype``, this site among its sites), for callers that patch
    several bases of one site."""
    site = basis.site
    adapter = get_adapter(model)
    source, target = (clean, corrupted) if mode == "denoising" else (corrupted, clean)
    dev = adapter.device
    C, Cp = basis.C.to(dev), basis.C_pinv.to(dev)
    with prepared(model, dtype), torch.no_grad():
        if reads is None:  # each prompt set runs once: the site and the logits in one pass
            reads = read_pair(adapter, clean, corrupted, [site], fn)
        value_clean, value_corrupted = reads.clean, reads.corrupted
        x_clean, x_corrupted = reads.x_clean[site], reads.x_corrupted[site]
        x_s, x_t = (x_clean, x_corrupted) if mode == "denoising" else (x_corrupted, x_clean)
        diff = torch.zeros_like(x_t, dtype=torch.float64)
        diff[:, pos_idx] = (x_s - x_t).double()[:, pos_idx]
        h_diff = diff @ C  # [batch, n_pos, k]

        n = target.shape[0]
        # the blocks before the site are the same for every patch: run them once
        resume = adapter.resume_state(target, site.layer)

        def patched_many(deltas: list[Tensor]) -> list[Tensor]:
            """One forward pass for several patches: the runs are stacked along the batch
            and the metric is applied to each run's own ``n`` rows, in order."""
            x = (x_t.double().repeat(len(deltas), 1, 1) + torch.cat(deltas)).to(x_t.dtype)
            if site.has_constant:
                x[..., -1] = 1.0
            start = None if resume is None else (resume[0], resume[1].repeat(len(deltas), 1, 1))
            logits = adapter.run(target.repeat(len(deltas), 1), read=Site("logits"),
                                 write=(site, x), resume=start)
            out = []
            for r in range(len(deltas)):
                value = fn(logits[r * n:(r + 1) * n])
                if not torch.isfinite(value).all():
                    raise DataError("the metric returned NaN or Inf on a patched run; check "
                                    "it on the logits")
                out.append(value.cpu())
            return out

        per_call = max(1, rows_per_pass // max(n * target.shape[1], 1))
        # the whole site (and every kept direction) share the passes of the groups
        items: list = [diff] + ([h_diff @ Cp] if with_all else []) + groups
        head = len(items) - len(groups)
        per = []
        bar = tqdm(total=len(groups), desc=f"patching {site.name}", disable=not progress)
        started = time.perf_counter()
        for start in range(0, len(items), per_call):
            block = items[start:start + per_call]
            per += patched_many([g if isinstance(g, Tensor) else h_diff[..., g] @ Cp[g]
                                 for g in block])
            if start == 0 and announce:
                _announce_cost(site, len(groups), per_call,
                               (time.perf_counter() - started) * 2 / len(block))
            bar.update(len([g for g in block if not isinstance(g, Tensor)]))
        bar.close()
        site_value = per[0]
        all_value = per[1] if with_all else torch.full_like(site_value, float("nan"))
        per = per[head:]
    per_example = torch.stack(per) if per else torch.zeros(0, clean.shape[0],
                                                           dtype=torch.float64)
    return PatchRuns(value_clean.cpu(), value_corrupted.cpu(), site_value, all_value,
                     per_example, float(diff.abs().max()) if diff.numel() else 0.0)
