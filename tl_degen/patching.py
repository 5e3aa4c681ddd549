"""Patching and attribution with one basis direction as the unit.

Conventions (pinned here, TransformerLens's):

* **Direction of a patch.** ``mode="denoising"`` (the default) runs the *corrupted* input and
  patches in coordinates from the *clean* run; ``mode="noising"`` runs the clean input and
  patches in corrupted coordinates. TransformerLens's patching module calls the first
  "denoising" (``get_act_patch_*`` patch clean activations into the corrupted run).
* **What a direction patch is.** With basis coordinates ``x̂ = x C`` at a site, patching the
  set of directions ``S`` replaces the target run's site vector ``x_t`` by
  ``x_t + Σ_(j∈S) (x̂_s[j] − x̂_t[j]) C⁺[j]`` at the chosen positions (``s``: the source run).
  Patching every kept direction is ``x_t + (x_s − x_t) C C⁺``: the whole-site patch minus the
  dropped directions' part, so the two agree exactly when nothing was dropped (a neuron
  basis, or a full-rank fit); :class:`PatchResult` reports both.
* **Metrics** are functions of the logits ``[batch, pos, d_vocab]`` returning a scalar or one
  value per example ``[batch]``; results are means over examples. The metric always sees the
  whole batch, in the order given (a metric may close over per-example answer tokens).
* **Attribution** of direction ``j`` is ``Σ_b Σ_t Δx̂[b,t,j] · ĝ[b,t,j]`` with
  ``Δx̂ = (x_s − x_t) C`` and ``ĝ = g C⁺ᵀ`` the gradient of the mean metric with respect to
  ``x̂`` (gradients transform with ``C⁺ᵀ``, not ``C``), ``g`` taken at the target run
  (``method="gradient"``) or averaged over ``x_t + α (x_s − x_t)`` with Gauss–Legendre weights
  (``method="integrated"``). Over the directions plus the dropped remainder
  ``Δx (I − C C⁺) gᵀ`` it sums exactly to the neuron-basis attribution ``Σ Δx · g``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.ablation import make_metric
from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.distributed import Shards, tensors_digest, weights_digest
from tl_degen.errors import BasisMismatchError, DataError, SiteError, TLDegenError
from tl_degen.fitting import token_batches
from tl_degen.model_state import prepared
from tl_degen.sections import integration_rule
from tl_degen.sites import Site

__all__ = [
    "patch_directions",
    "PatchResult",
    "attribution_patch",
    "AttributionResult",
    "to_basis",
    "path_patch",
    "PathPatchResult",
    "MODES",
]

MODES = ("denoising", "noising")
Metric = Callable[[Tensor], Tensor]
Directions = None | Sequence[int] | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------- helpers
def lookup_basis(bases: BasisSet | InteractionBasis, site: str | Site | None,
                 model=None) -> InteractionBasis:
    """The basis of ``site`` from a :class:`BasisSet` (checked against ``model``) or a single
    :class:`InteractionBasis` (checked to be of ``site``)."""
    if isinstance(bases, InteractionBasis):
        if site is not None and Site.parse(site) != bases.site:
            raise BasisMismatchError(
                f"this basis was fitted at site {bases.site.name!r}, not {Site.parse(site).name!r}"
                "; pass the basis of that site, or the whole BasisSet")
        if model is not None:  # a lone basis carries no weight fingerprint: check the size
            adapter = get_adapter(model)
            adapter.check_site(bases.site)
            d = adapter.site_dim(bases.site) + int(bases.site.has_constant)
            if d != bases.d_site:
                raise BasisMismatchError(
                    f"the basis of {bases.site.name!r} has {bases.d_site} coordinates but that "
                    f"site of this model has {d}; was it fitted on another model? (pass the "
                    "BasisSet to have the model's weights checked too)")
        return bases
    if not isinstance(bases, BasisSet):
        raise TLDegenError(f"bases must be a BasisSet (from fit_bases) or an InteractionBasis, "
                           f"got {type(bases).__name__}")
    if model is not None:
        bases.check_model(model)
    if site is None:
        raise SiteError("name the site, e.g. site='resid_mid.0:last'")
    want = Site.parse(site)
    try:
        return bases[want]
    except KeyError:
        near = [s.name for s in bases.sites if (s.kind, s.layer) == (want.kind, want.layer)]
        hint = (f"; this set has that site with other positions: {near}" if near else
                f"; fit bases at that site first (this set has {[s.name for s in bases.sites]})")
        raise BasisMismatchError(f"no basis for site {want.name!r}{hint}") from None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TLDegenError(f"mode must be 'denoising' (run corrupted, patch in clean) or "
                           f"'noising' (run clean, patch in corrupted), got {mode!r}")


def _pair_tokens(adapter, clean, corrupted) -> tuple[Tensor, Tensor]:
    """Validated ``[batch, pos]`` clean and corrupted tokens of the same shape."""
    (c,) = token_batches(clean, 1 << 62, adapter) if isinstance(clean, Tensor) else (None,)
    (k,) = token_batches(corrupted, 1 << 62, adapter) if isinstance(corrupted, Tensor) else (None,)
    if c is None or k is None:
        raise DataError("clean_tokens and corrupted_tokens must be [batch, pos] integer tensors")
    if c.shape != k.shape:
        raise DataError(f"clean tokens {tuple(c.shape)} and corrupted tokens {tuple(k.shape)} "
                        "differ in shape; pair each clean prompt with one corrupted prompt of "
                        "the same length (pad or truncate)")
    return c, k


def _index(value, what: str) -> int:
    """An integer index (Python, numpy or 0-d tensor; not a bool), else :class:`DataError`."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise DataError(f"{what} must be integers, got the boolean {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise DataError(f"{what} must be integers, got {value!r} "
                        f"({type(value).__name__})") from None


def _index_list(value, what: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) and not (
            isinstance(value, Tensor)):
        raise DataError(f"{what} must be a list of integers, got {value!r}")
    if isinstance(value, Tensor) and value.dim() == 0:
        raise DataError(f"{what} must be a list of integers, got a scalar tensor")
    return [_index(v, what) for v in value]


def _positions(site: Site, positions, n_pos: int) -> list[int]:
    """Indices into the site's positions of the ones to patch (default: all of them)."""
    site_pos = site.resolve_positions(n_pos)
    if positions is None:
        return list(range(len(site_pos)))
    wanted = ([_index(positions, "positions")] if not isinstance(positions, Iterable)
              or isinstance(positions, Tensor) and positions.dim() == 0
              else _index_list(positions, "positions"))
    out = []
    for p in wanted:
        q = p + n_pos if p < 0 else p
        if q not in site_pos:
            raise DataError(f"position {p!r} is not one of site {site.name!r}'s positions "
                            f"{site_pos} (sequence length {n_pos}); fit the basis at a site "
                            "covering it, e.g. 'resid_pre.0' for all positions")
        out.append(site_pos.index(q))
    return sorted(set(out))


def _groups(directions: Directions, k: int) -> tuple[list[list[int]], list[str]]:
    """Direction groups: ``None`` → each direction alone; a list whose items are integers
    (each alone) or lists of integers (patched together, no repeats)."""
    if directions is None:
        return [[j] for j in range(k)], [str(j) for j in range(k)]
    if isinstance(directions, (str, bytes)) or not (
            isinstance(directions, Iterable) or isinstance(directions, Tensor)):
        raise DataError(f"directions must be None, a list of indices or a list of lists of "
                        f"indices, got {directions!r}")
    groups: list[list[int]] = []
    for d in directions:
        scalar = not isinstance(d, Iterable) or isinstance(d, Tensor) and d.dim() == 0
        g = [_index(d, "directions")] if scalar else _index_list(d, "directions")
        bad = [j for j in g if not 0 <= j < k]
        if bad:
            raise DataError(f"direction(s) {bad} out of range: the basis has {k} directions "
                            f"(0..{k - 1})")
        if len(set(g)) != len(g):
            raise DataError(f"direction group {g} repeats an index; each direction can be "
                            "patched once per group")
        groups.append(g)
    labels = ["none" if not g else str(g[0]) if len(g) == 1 else
              (f"{g[0]}..{g[-1]}" if g == list(range(g[0], g[-1] + 1)) else
               "{" + ",".join(map(str, g)) + "}") for g in groups]
    return groups, labels


def _metric(metric: Metric) -> Callable[[Tensor], Tensor]:
    """Per-example metric values ``[batch]`` (a scalar is broadcast), validated."""
    if isinstance(metric, str) or not callable(metric):
        raise TLDegenError("metric must be a function of the logits [batch, pos, d_vocab] "
                           "returning a scalar or one value per example, e.g. a logit difference")
    fn = make_metric(metric)
    return lambda logits: fn(logits, slice(None))


def _run_metric(adapter, tokens, fn, write=None) -> Tensor:
    logits = adapter.run(tokens, read=Site("logits"), write=write)
    value = fn(logits)
    if not torch.isfinite(value).all():
        raise DataError("the metric returned NaN or Inf; check it on the model's logits")
    return value


# ---------------------------------------------------------------------------- patching
@dataclass
class PatchResult:
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

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable); :meth:`from_dict` rebuilds the result."""
        return {"site": self.site.name, "method": self.method, "mode": self.mode,
                "groups": self.groups, "labels": self.labels, "values": self.values.tolist(),
                "per_example": self.per_example.tolist(), "clean": self.clean,
                "corrupted": self.corrupted, "site_value": self.site_value,
                "all_value": self.all_value, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> PatchResult:
        return cls(Site.parse(d["site"]), d["method"], d["mode"], d["groups"], d["labels"],
                   torch.tensor(d["values"], dtype=torch.float64),
                   torch.tensor(d["per_example"], dtype=torch.float64), d["clean"],
                   d["corrupted"], d["site_value"], d["all_value"], d["positions"])

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` groups with the largest absolute effect, as ``(label, effect)``."""
        order = self.effects.abs().argsort(descending=True)[:n]
        return [(self.labels[i], float(self.effects[i])) for i in order]

    def __repr__(self) -> str:
        rows = "\n".join(f"    {lab:>10s}  {eff:+.5g}" for lab, eff in self.top(5))
        return (f"PatchResult({self.site.name!r}, method={self.method!r}, mode={self.mode!r}, "
                f"{len(self.groups)} groups, clean={self.clean:.5g}, "
                f"corrupted={self.corrupted:.5g}, whole site={self.site_value:.5g}, "
                f"all kept directions={self.all_value:.5g})\n  largest effects:\n{rows}")


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
    (``start_at_layer``), so the blocks upstream of the site run once, not once per patch; a
    ``TransformerBridge`` runs from the embedding (its ``start_at_layer`` reruns those blocks).

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (the one the bases fit).
        clean_tokens, corrupted_tokens: ``[batch, pos]`` paired prompts.
        bases: a :class:`BasisSet` containing ``site`` (LIB, PCA or neuron), or one basis.
        site: e.g. ``"resid_mid.0:last"``; must match a basis' site, positions included.
        metric: function of the logits ``[batch, pos, d_vocab]`` → scalar or ``[batch]``.
        directions: ``None`` (each direction alone), a list of indices (each alone), or a list
            of lists (each a group patched together), e.g. ``[list(range(n)) for n in ...]``
            for cumulative patching.
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
    if not isinstance(rows_per_pass, int) or rows_per_pass < 1:
        raise TLDegenError(f"rows_per_pass must be a positive integer, got {rows_per_pass!r}")
    basis = lookup_basis(bases, site, model)
    site = basis.site
    if site.kind == "logits":
        raise SiteError("patching the logits is the output itself; choose an earlier site")
    adapter = get_adapter(model)
    clean, corrupted = _pair_tokens(adapter, clean_tokens, corrupted_tokens)
    pos_idx = _positions(site, positions, clean.shape[1])
    groups, labels = _groups(directions, basis.k)
    fn = _metric(metric)
    source, target = (clean, corrupted) if mode == "denoising" else (corrupted, clean)
    dev = adapter.device
    C, Cp = basis.C.to(dev), basis.C_pinv.to(dev)
    with prepared(model, dtype), torch.no_grad():
        value_clean = fn(adapter.read_sites(clean, [Site("logits")])[0])
        value_corrupted = fn(adapter.read_sites(corrupted, [Site("logits")])[0])
        (x_s,) = adapter.read_sites(source, [site])
        (x_t,) = adapter.read_sites(target, [site])
        _check_finite(x_s, x_t, site=site)
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
            x[..., -1] = 1.0
            start = None if resume is None else (resume[0], resume[1].repeat(len(deltas), 1, 1))
            logits = adapter.run(target.repeat(len(deltas), 1), read=Site("logits"),
                                 write=(site, x), resume=start)
            out = []
            for r in range(len(deltas)):
                value = fn(logits[r * n:(r + 1) * n])
                if not torch.isfinite(value).all():
                    raise DataError("the metric returned NaN or Inf; check it on the logits")
                out.append(value)
            return out

        per_call = max(1, rows_per_pass // max(n * target.shape[1], 1))
        per = []
        bar = tqdm(total=len(groups), desc=f"patching {site.name}", disable=not progress)
        for start in range(0, len(groups), per_call):
            block = groups[start:start + per_call]
            per += patched_many([h_diff[..., g] @ Cp[g] for g in block])
            bar.update(len(block))
        bar.close()
        site_value, all_value = (float(v.mean()) for v in patched_many([diff, h_diff @ Cp]))
    per_example = torch.stack(per).cpu() if per else torch.zeros(0, clean.shape[0])
    site_pos = site.resolve_positions(clean.shape[1])
    return PatchResult(site, basis.method, mode, groups, labels, per_example.mean(1),
                       per_example, float(value_clean.mean()), float(value_corrupted.mean()),
                       site_value, all_value, [site_pos[i] for i in pos_idx])


def _check_finite(*xs: Tensor, site: Site) -> None:
    for x in xs:
        if not torch.isfinite(x).all():
            raise DataError(f"NaN or Inf activations at {site.name}; check the model and inputs")


# ---------------------------------------------------------------------------- attribution
@dataclass
class AttributionResult:
    """Per-direction attribution at each site (DESIGN.md §3 conventions; module docstring).

    Attributes:
        attributions: site name → ``[n_site_positions, k]`` ``Σ_b Δx̂ · ĝ`` per position and
            direction (mean metric, so already divided by the batch size).
        dropped: site name → the part outside the kept directions, ``Σ Δx (I − C C⁺) gᵀ``.
        neuron: site name → ``[n_site_positions, d_site]`` the same in the neuron basis
            (``Δx ⊙ g``; the constant coordinate last, always 0).
        delta: site name → the exact effect of patching the whole site (for comparison).
        method, mode, n_alpha: how it was computed.

    Examples:
        >>> attr = tl_degen.attribution_patch(model, clean, corrupted, bases,
        ...                                   "resid_mid.0:last", logit_diff)
        >>> attr.per_direction("resid_mid.0:last")  # [k]
        >>> attr.total("resid_mid.0:last"), attr.delta["resid_mid.0:last"]
    """

    attributions: dict[str, Tensor]
    dropped: dict[str, float]
    neuron: dict[str, Tensor]
    delta: dict[str, float]
    method: str
    mode: str
    n_alpha: int
    basis_method: str | None = None

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable); :meth:`from_dict` rebuilds the result."""
        return {"attributions": {k: v.tolist() for k, v in self.attributions.items()},
                "dropped": self.dropped,
                "neuron": {k: v.tolist() for k, v in self.neuron.items()},
                "delta": self.delta, "method": self.method, "mode": self.mode,
                "n_alpha": self.n_alpha, "basis_method": self.basis_method}

    @classmethod
    def from_dict(cls, d: dict) -> AttributionResult:
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls({k: t(v) for k, v in d["attributions"].items()}, dict(d["dropped"]),
                   {k: t(v) for k, v in d["neuron"].items()}, dict(d["delta"]), d["method"],
                   d["mode"], d["n_alpha"], d["basis_method"])

    def per_direction(self, site: str) -> Float[Tensor, " k"]:
        """Attribution per direction, summed over positions."""
        return self.attributions[Site.parse(site).name].sum(0)

    def total(self, site: str) -> float:
        """Sum over directions plus the dropped remainder (= the neuron-basis total)."""
        name = Site.parse(site).name
        return float(self.attributions[name].sum()) + self.dropped[name]

    def __repr__(self) -> str:
        lines = [f"AttributionResult(method={self.method!r}, mode={self.mode!r}, "
                 f"basis={self.basis_method!r})"]
        for name, a in self.attributions.items():
            per = a.sum(0)
            top = per.abs().argsort(descending=True)[:3].tolist()
            lines.append(f"  {name}: total={self.total(name):+.5g} (whole-site patch "
                         f"{self.delta[name]:+.5g}), dropped={self.dropped[name]:+.3g}, top "
                         + ", ".join(f"{j}: {float(per[j]):+.4g}" for j in top))
        return "\n".join(lines)


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    bases: BasisSet | InteractionBasis,
    sites: str | Site | Sequence[str | Site],
    metric: Metric,
    *,
    method: str = "gradient",
    n_alpha: int = 16,
    mode: str = "denoising",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> AttributionResult:
    """Attribution patching per basis direction: ``Δx̂ · ∂metric/∂x̂`` at each site.

    Args:
        sites: one site or several (each must have a basis in ``bases``).
        metric: differentiable function of the logits → scalar or ``[batch]`` (averaged).
        method: ``"gradient"`` (first-order, gradient at the target run) or ``"integrated"``
            (integrated gradients along ``x_t + α (x_s − x_t)``, ``n_alpha`` Gauss–Legendre
            points; its total approaches the whole-site patch effect).
        mode: ``"denoising"`` (gradient on the corrupted run, ``Δ = clean − corrupted``) or
            ``"noising"``.
        distributed: inside a ``torch.distributed`` process group each rank passes its own
            shard of prompt pairs; each rank's mean metric counts by its share of the pairs, so
            every rank returns the result of all shards together for a metric that averages
            over examples (:mod:`tl_degen.distributed`; ``False`` opts out).

    Returns:
        An :class:`AttributionResult`; ``result.total(site)`` equals the neuron-basis
        attribution ``result.neuron[site].sum()`` exactly, for any basis.

    Examples:
        >>> attr = tl_degen.attribution_patch(model, clean, corrupt, bases,
        ...                                   ["resid_mid.0:last"], logit_diff)
        >>> attr.per_direction("resid_mid.0:last")[:5]
    """
    shards = Shards(distributed)
    with shards.step("attribution_patch (checking the arguments)"):
        _check_mode(mode)
        if method not in ("gradient", "integrated"):
            raise TLDegenError(f"method must be 'gradient' or 'integrated', got {method!r}")
        site_list = [sites] if isinstance(sites, (str, Site)) else list(sites)
        if not site_list:
            raise SiteError("give at least one site")
        found = [lookup_basis(bases, s, model) for s in site_list]
        adapter = get_adapter(model)
        clean, corrupted = _pair_tokens(adapter, clean_tokens, corrupted_tokens)
        fn = _metric(metric)
        fingerprint = {"sites": [b.site.name for b in found], "method": method,
                       "n_alpha": n_alpha, "mode": mode, "dtype": str(dtype),
                       "n_pos": clean.shape[1]}
        if shards.active:
            fingerprint["weights"] = weights_digest(model)
            fingerprint["bases"] = tensors_digest([t for b in found for t in (b.C, b.C_pinv)])
    shards.agree("attribution_patch", fingerprint)
    source, target = (clean, corrupted) if mode == "denoising" else (corrupted, clean)
    alphas, weights = ([0.0], [1.0]) if method == "gradient" else integration_rule(
        "gauss-legendre", n_alpha)
    dev = adapter.device
    n_local = clean.shape[0]
    (n_total,) = shards.sum_ints([n_local])
    share = n_local / n_total  # a rank's mean metric weighs as its share of the examples
    out = AttributionResult({}, {}, {}, {}, method, mode, len(alphas),
                            getattr(bases, "method", None) or found[0].method)
    with prepared(model, dtype):
        with shards.step("attribution_patch (unpatched run)"), torch.no_grad():
            base = float(fn(adapter.read_sites(target, [Site("logits")])[0]).mean())
        (base,) = shards.sum_floats([base * share])
        for basis in tqdm(found, desc="attribution", disable=not progress):
            site = basis.site
            with shards.step(f"attribution_patch ({site.name})"):
                if site.kind == "logits":
                    raise SiteError("attribution at the logits is the metric's own gradient; "
                                    "choose an earlier site")
                with torch.no_grad():
                    (x_s,) = adapter.read_sites(source, [site])
                    (x_t,) = adapter.read_sites(target, [site])
                _check_finite(x_s, x_t, site=site)
                diff = (x_s - x_t).double()
                diff[..., -1] = 0.0
                grad = torch.zeros_like(diff)
                for a, w in zip(alphas, weights):
                    x = (x_t.double() + a * diff).to(x_t.dtype).requires_grad_(True)
                    value = _run_metric(adapter, target, fn, write=(site, x)).mean()
                    (g,) = torch.autograd.grad(value, x)
                    grad += w * share * g.double()
                # patches keep c = 1 (the constant coordinate is not an activation), so its
                # gradient takes no part; with centered bases it only touches the constant
                # direction, whose coordinate never changes
                grad[..., -1] = 0.0
                C, Cp = basis.C.to(dev), basis.C_pinv.to(dev)
                h_diff, h_grad = diff @ C, grad @ Cp.T
                rest = diff - h_diff @ Cp
                with torch.no_grad():
                    x = x_s.clone()
                    x[..., -1] = 1.0
                    delta = float(_run_metric(adapter, target, fn, write=(site, x)).mean())
            name = site.name
            out.attributions[name] = shards.sum((h_diff * h_grad).sum(0)).cpu()
            out.neuron[name] = shards.sum((diff * grad).sum(0)).cpu()
            dropped, delta = shards.sum_floats([float((rest * grad).sum()), delta * share])
            out.dropped[name] = dropped
            out.delta[name] = delta - base
    return out


# ---------------------------------------------------------------------------- to_basis
def to_basis(
    x,
    basis: InteractionBasis,
    *,
    kind: str = "activation",
) -> Float[Tensor, "... k"]:
    """Re-express activations, differences or gradients at a site in basis coordinates.

    Args:
        x: one of
            * a tensor ``[..., d_site]`` (with or without the constant coordinate);
            * a TransformerLens ``ActivationCache`` (from ``run_with_cache``): the site vector
              is assembled from its hooks and the site's positions taken, ``[batch, n_pos, k]``;
            * a TransformerLens 4 ``GradientCache`` (``transformer_lens.tools.analysis.
              cache_activation_and_gradient``, used by its attribution patching): its
              ``activations`` for ``kind="activation"``, its ``gradients`` for
              ``kind="gradient"``.
        basis: the site's :class:`InteractionBasis`.
        kind: ``"activation"`` (``x̂ = x C``, the constant coordinate 1), ``"difference"``
            (an activation difference: constant 0, so centering cancels) or ``"gradient"``
            (``ĝ = g C⁺ᵀ``, the gradient with respect to ``x̂``; constant entry 0). Pairing
            them, ``Δx̂ · ĝ = Δx C C⁺ gᵀ``: the neuron-basis ``Δx · g`` restricted to the
            kept directions.

    Returns:
        Coordinates ``[..., k]`` in float64.

    Examples:
        >>> _, cache = model.run_with_cache(tokens)
        >>> coords = tl_degen.to_basis(cache, bases["resid_post.0:last"])
    """
    if kind not in ("activation", "difference", "gradient"):
        raise TLDegenError(f"kind must be 'activation', 'difference' or 'gradient', got {kind!r}")
    if not isinstance(basis, InteractionBasis):
        raise TLDegenError("basis must be one InteractionBasis, e.g. bases['resid_post.0']")
    site = basis.site
    if not isinstance(x, Tensor):
        if kind == "difference":
            raise TLDegenError("a cache holds activations, not differences: convert each run "
                               "with kind='activation' and subtract the coordinates")
        x = _from_cache(x, site, kind)
    if not torch.isfinite(x).all():
        raise DataError(f"NaN or Inf values given for {site.name}")
    d = basis.d_site
    if x.shape[-1] == d - 1 and site.has_constant:
        fill = 1.0 if kind == "activation" else 0.0
        x = torch.cat([x, torch.full_like(x[..., :1], fill)], dim=-1)
    elif x.shape[-1] != d:
        raise BasisMismatchError(
            f"vectors of size {x.shape[-1]} do not fit site {site.name!r} (size {d} with the "
            f"constant coordinate, {d - 1} without); was the basis fitted on another model or "
            "site?")
    x = x.double()
    if kind == "gradient":
        return x @ basis.C_pinv.to(x.device).T
    return x @ basis.C.to(x.device)


def _from_cache(cache, site: Site, kind: str) -> Tensor:
    """Assemble a site vector ``[batch, n_pos, d_site]`` from a TransformerLens cache."""
    if site.kind == "logits":
        raise SiteError("the logits are not in an activation cache; pass the logits tensor")
    if hasattr(cache, "activations") and hasattr(cache, "gradients"):  # TL4 GradientCache
        if kind == "gradient" and site.kind == "resid_mid":
            raise SiteError(
                "gradients recorded at hook_resid_mid of a TransformerBridge miss the skip "
                "connection (DESIGN.md §6); use tl_degen.attribution_patch for resid_mid, or "
                "a GradientCache at hook_resid_pre/hook_resid_post")
        store = cache.gradients if kind == "gradient" else cache.activations
        get = store.__getitem__
        has = store.__contains__
    else:
        model = getattr(cache, "model", None)
        hooked = model is not None and "HookedTransformer" in {
            c.__name__ for c in type(model).__mro__}
        if kind == "gradient" and site.kind == "resid_mid" and not hooked:
            raise SiteError(
                "gradients recorded at hook_resid_mid of a TransformerBridge miss the skip "
                "connection (DESIGN.md §6), and this cache is not from a HookedTransformer; use "
                "tl_degen.attribution_patch for resid_mid")
        if kind == "gradient":
            get = lambda n: cache[n + "_grad"]  # noqa: E731  (run_with_cache(incl_bwd=True))
            has = lambda n: _has(cache, n + "_grad")  # noqa: E731
        else:
            get, has = cache.__getitem__, lambda n: _has(cache, n)
    L = site.layer
    if site.kind == "mlp_post":
        names = [f"blocks.{L}.mlp.hook_post", f"blocks.{L}.hook_resid_post"]
        if kind != "gradient":
            names.append(f"blocks.{L}.hook_mlp_out")
    else:
        names = [f"blocks.{L}.hook_{site.kind}"]
    missing = [n for n in names if not has(n)]
    if missing:
        raise SiteError(f"the cache has no {missing} (needed for {site.name}); cache those "
                        "hooks (names_filter) or pass the tensor")
    parts = {n: get(n) for n in names}
    if any(v is None for v in parts.values()):
        raise DataError(f"the cache holds no value for {names}; was the backward run?")
    if site.kind == "mlp_post":
        post = parts[names[0]]
        if kind == "gradient":  # the bypass stream adds straight into resid_post
            bypass = parts[names[1]]
        else:
            bypass = parts[names[1]] - parts[names[2]]
        vec = torch.cat([post, bypass.to(post.dtype)], dim=-1)
    else:
        vec = parts[names[0]]
    return vec[:, site.resolve_positions(vec.shape[1])]


def _has(cache, name: str) -> bool:
    try:
        return name in cache.keys()
    except AttributeError:
        return name in cache


# ---------------------------------------------------------------------------- path patching
@dataclass
class PathPatchResult:
    """The metric after patching single edges of the interaction graph.

    Attributes:
        in_site, out_site: the layer pair.
        edges: ``(j, i)`` pairs, source direction ``j`` at ``in_site`` → target direction
            ``i`` at ``out_site`` (``i = None``: every target direction).
        values: ``[n_edges]`` mean metric with that edge patched.
        base, clean, corrupted: unpatched metrics (``base`` is the run patched into).
        strengths: ``[n_edges]`` the graph's edge strengths ``E[i, j]`` (NaN for ``i = None``).

    Examples:
        >>> res = tl_degen.path_patch(model, clean, corrupted, graph, "resid_pre.0",
        ...                           "resid_mid.0:last", logit_diff, edges=[(1, 1), (2, None)])
        >>> res.effects, res.strengths  # both [n_edges]
        >>> res.as_dict()["values"]
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
    bases = graph.bases
    bases.check_model(model)
    a, b = Site.parse(in_site), Site.parse(out_site)
    if (a, b) not in graph.edges:
        raise SiteError(f"{a.name} -> {b.name} is not a consecutive pair of this graph; pairs: "
                        f"{[f'{p.name} -> {q.name}' for p, q in graph.pairs()]}")
    E = graph.edges[(a, b)]
    b_in, b_out = bases[a], bases[b]
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
