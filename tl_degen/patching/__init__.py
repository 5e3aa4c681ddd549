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

from tl_degen.patching.attribution import AttributionResult, attribution_patch
from tl_degen.patching.common import MODES, lookup_basis
from tl_degen.patching.directions import PatchResult, patch_directions
from tl_degen.patching.paths import PathPatchResult, path_patch
from tl_degen.patching.to_basis import to_basis

__all__ = [
    "patch_directions",
    "PatchResult",
    "attribution_patch",
    "AttributionResult",
    "to_basis",
    "path_patch",
    "PathPatchResult",
    "lookup_basis",
    "MODES",
]
