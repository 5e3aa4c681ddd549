"""TransformerLens caches in basis coordinates: :func:`to_basis`."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.basis import InteractionBasis
from tl_degen.errors import BasisMismatchError, DataError, SiteError, TLDegenError
from tl_degen.sites import Site


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
    if x is None or isinstance(x, (int, float, str, bytes, list, tuple)):
        raise DataError(f"give {site.name}'s vectors as a [..., {basis.d_site - 1}] tensor or "
                        f"an ActivationCache, got {type(x).__name__}")
    if not isinstance(x, Tensor):
        if kind == "difference":
            raise TLDegenError("a cache holds activations, not differences: convert each run "
                               "with kind='activation' and subtract the coordinates")
        x = _from_cache(x, site, kind)
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise DataError(f"give {site.name}'s vectors as a [..., {basis.d_site - 1}] tensor (or "
                        f"an ActivationCache), got {type(x).__name__}"
                        + (" of shape ()" if isinstance(x, Tensor) else ""))
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
