"""What the patching verbs share: modes, argument checks, metrics, one run
(conventions: :mod:`tl_degen.patching`)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from tl_degen.ablation import make_metric
from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.errors import BasisMismatchError, DataError, SiteError, TLDegenError
from tl_degen.fitting import token_batches
from tl_degen.sites import Site

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
    if not out:
        raise DataError("positions is empty: nothing would be patched; give the positions to "
                        "patch, or None for all of the site's positions")
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


def _check_finite(*xs: Tensor, site: Site) -> None:
    for x in xs:
        if not torch.isfinite(x).all():
            raise DataError(f"NaN or Inf activations at {site.name}; check the model and inputs")
