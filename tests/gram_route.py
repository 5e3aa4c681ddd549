"""The reference implementation's arithmetic, rebuilt from the library's pieces: activation
and Jacobian Grams formed as sums of outer products and eigendecomposed (no square-root
factors). Used to show which of the two moves under a function-preserving
reparameterisation where tl_degen departs from the reference (tests/test_reference.py)."""

from __future__ import annotations

import torch

import tl_degen
from tl_degen.adapters import get_adapter
from tl_degen.basis import Threshold, lib_rotation, whiten
from tl_degen.model_state import prepared
from tl_degen.sections.plan import accumulate_jacobian_gram
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator, MomentAccumulator


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """``F`` with ``Fᵀ F = gram`` read off the Gram's eigendecomposition (its noise floor
    included), i.e. whitening exactly as the reference does."""
    evals, vecs = torch.linalg.eigh(gram)
    return vecs.T * evals.clamp_min(0).sqrt()[:, None]


def gram_route_lambdas(model, tokens, sites: list[str], threshold: Threshold
                       ) -> dict[str, torch.Tensor]:
    """Every Λ (before truncation) of a LIB fit done the reference's way, per site (the last
    site is taken as the unrotated logits)."""
    adapter = get_adapter(model)
    parsed = [Site.parse(s) for s in sites]
    for s in parsed:
        s.resolve_positions(tokens.shape[1])
    out: dict[str, torch.Tensor] = {}
    next_C = None
    with prepared(model, torch.float64):
        for i in range(len(parsed) - 2, -1, -1):
            site, out_site = parsed[i], parsed[i + 1]
            x = tl_degen.site_activations(model, tokens, site, batch_size=tokens.shape[0])
            acc = MomentAccumulator(x.shape[-1])
            acc.update(x)
            jac = GramAccumulator(x.shape[-1])
            accumulate_jacobian_gram(adapter, tokens, site, out_site, x, next_C, jac,
                                     alphas=[1.0], weights=[1.0])
            wh = whiten(acc.mean, gram_factor(acc.gram()), center=True, has_constant=True,
                        threshold=threshold)
            formed = jac.value  # the Jacobian Gram formed, as the reference forms it
            rot = lib_rotation(wh, torch.zeros_like(formed[:1]), formed, constant_first=True,
                               threshold=threshold)
            out[site.name] = rot.all_eigenvalues
            next_C = rot.C
    return out
