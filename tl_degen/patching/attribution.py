"""Attribution patching in a basis: :func:`attribution_patch`,
:class:`AttributionResult`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.distributed import Shards, tensors_digest, weights_digest
from tl_degen.errors import ArgumentError, SiteError, TLDegenError, UnknownKeyError
from tl_degen.io import Serialisable, as_tensor
from tl_degen.model_state import prepared
from tl_degen.patching.common import (
    Metric,
    _check_finite,
    _check_mode,
    _metric,
    _pair_tokens,
    _run_metric,
    lookup_basis,
)
from tl_degen.sections.rules import integration_rule
from tl_degen.sites import Site


# ---------------------------------------------------------------------------- attribution
@dataclass
class AttributionResult(Serialisable):
    """Per-direction attribution at each site (DESIGN.md §3 conventions; module docstring).

    Attributes:
        attributions: site name → ``[n_site_positions, k]`` ``Σ_b Δx̂ · ĝ`` per position and
            direction (mean metric, so already divided by the batch size).
        dropped: site name → the part outside the kept directions, ``Σ Δx (I − C C⁺) gᵀ``.
        neuron: site name → ``[n_site_positions, d_site]`` the same in the neuron basis
            (``Δx ⊙ g``; the constant coordinate last, always 0).
        delta: site name → the exact effect of patching the whole site (for comparison).
        method, mode, n_alpha: how it was computed.
        basis_method: the basis (``"lib"``, ``"pca"``, ``"neuron"``).

    ``to_dict()`` gives the constructor's arguments: ``{"attributions": {site: tensor},
    "dropped": {site: float}, "neuron": {site: tensor}, "delta": {site: float}, "method",
    "mode", "n_alpha", "basis_method"}``; ``from_dict`` / ``save`` / ``load`` round-trip it
    (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is the same with the tensors as
    lists (JSON), which ``from_dict`` reads too.

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

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"attributions": dict(self.attributions), "dropped": dict(self.dropped),
                "neuron": dict(self.neuron), "delta": dict(self.delta), "method": self.method,
                "mode": self.mode, "n_alpha": self.n_alpha, "basis_method": self.basis_method}

    def as_dict(self) -> dict:
        """Plain Python (JSON-serialisable); :meth:`from_dict` rebuilds the result."""
        return {"attributions": {k: v.tolist() for k, v in self.attributions.items()},
                "dropped": self.dropped,
                "neuron": {k: v.tolist() for k, v in self.neuron.items()},
                "delta": self.delta, "method": self.method, "mode": self.mode,
                "n_alpha": self.n_alpha, "basis_method": self.basis_method}

    @classmethod
    def from_dict(cls, d: dict) -> AttributionResult:
        """Rebuild from :meth:`to_dict` (or :meth:`as_dict`)."""
        return cls({k: as_tensor(v) for k, v in d["attributions"].items()}, dict(d["dropped"]),
                   {k: as_tensor(v) for k, v in d["neuron"].items()}, dict(d["delta"]),
                   d["method"], d["mode"], d["n_alpha"], d.get("basis_method"))

    def _name(self, site: str) -> str:
        name = Site.parse(site).name
        if name not in self.attributions:
            raise UnknownKeyError(f"no site {name!r} in this result; it has "
                                  f"{list(self.attributions)}")
        return name

    def per_direction(self, site: str) -> Float[Tensor, " k"]:
        """Attribution per direction, summed over positions."""
        return self.attributions[self._name(site)].sum(0)

    def top(self, site: str, n: int) -> list[int]:
        """The ``n`` directions with the largest |attribution| (summed over positions),
        largest first: e.g. ``patch_directions(..., directions=result.top(site, 16))``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TLDegenError(f"n must be a positive integer, got {n!r}")
        per = self.per_direction(site)
        return per.abs().argsort(descending=True)[:n].tolist()

    def total(self, site: str) -> float:
        """Sum over directions plus the dropped remainder (= the neuron-basis total)."""
        name = self._name(site)
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


def metric_gradient(adapter, tokens: Int[Tensor, "batch pos"], fn, site: Site,
                    x: Float[Tensor, "batch n_pos d_site+1"]) -> Float[Tensor, "batch n_pos d+1"]:
    """``∂ mean(metric) / ∂x`` (float64) with ``x`` written at ``site`` on a run of
    ``tokens``; the constant coordinate's entry is 0 (patches keep ``c = 1``: it is not an
    activation, and with centered bases it only touches the constant direction, whose
    coordinate never changes)."""
    x = x.detach().requires_grad_(True)
    value = _run_metric(adapter, tokens, fn, write=(site, x)).mean()
    if not value.requires_grad:
        raise ArgumentError(
            "metric: its value does not depend differentiably on the logits (no gradient: "
            "computed under torch.no_grad, through .item()/.detach()/argmax, or a constant); "
            "attribution needs a differentiable metric such as a logit difference")
    (g,) = torch.autograd.grad(value, x)
    g = g.double()
    g[..., -1] = 0.0
    return g


def direction_attributions(diff: Float[Tensor, "batch n_pos d+1"],
                           grad: Float[Tensor, "batch n_pos d+1"], basis: InteractionBasis,
                           ) -> tuple[Float[Tensor, "n_pos k"], Float[Tensor, "batch n_pos d+1"]]:
    """``Σ_b Δx̂ · ĝ`` per position and direction (``Δx̂ = Δx C``, ``ĝ = g C⁺ᵀ``), and
    the part of ``Δx`` outside the kept directions, ``Δx (I − C C⁺)``; ``diff``'s constant
    coordinate must be 0."""
    C, Cp = basis.C.to(diff.device), basis.C_pinv.to(diff.device)
    h_diff = diff @ C
    return (h_diff * (grad @ Cp.T)).sum(0), diff - h_diff @ Cp


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
        if sites is None or isinstance(sites, (int, float)):
            raise SiteError(f"give at least one site, e.g. 'resid_mid.0:last'; got {sites!r}")
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
                    x = (x_t.double() + a * diff).to(x_t.dtype)
                    grad += w * share * metric_gradient(adapter, target, fn, site, x)
                attributions, rest = direction_attributions(diff, grad, basis)
                with torch.no_grad():
                    x = x_s.clone()
                    x[..., -1] = 1.0
                    delta = float(_run_metric(adapter, target, fn, write=(site, x)).mean())
            name = site.name
            out.attributions[name] = shards.sum(attributions).cpu()
            out.neuron[name] = shards.sum((diff * grad).sum(0)).cpu()
            dropped, delta = shards.sum_floats([float((rest * grad).sum()), delta * share])
            out.dropped[name] = dropped
            out.delta[name] = delta - base
    return out
