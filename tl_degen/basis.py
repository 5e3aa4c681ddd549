"""Per-site bases: LIB (interaction basis), PCA and neuron (DESIGN.md §4 steps 3-7, 10).

Conventions (pinned here, relied on everywhere):

* Row vectors. A site vector ``x`` (``[d]``, constant coordinate last) has coordinates
  ``x̂ = x C`` (``C``: ``[d, k]``), and ``x̂ C⁺`` (``C⁺``: ``[k, d]``) maps back.
* Columns of ``C`` are ordered constant direction first (when centering), then by
  descending eigenvalue; ``eigenvalues[j]`` belongs to column ``j``.
* Gradients transform the other way: ``∂/∂x̂ = ∂/∂x · C⁺ᵀ``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.errors import BasisMismatchError, SiteError, TLDegenError
from tl_degen.io import Serialisable, as_tensor
from tl_degen.sites import Site

__all__ = ["Threshold", "Dropped", "InteractionBasis", "whiten", "lib_rotation", "Rotation",
           "METHODS", "numerical_null_cutoff", "cut_gap", "AMBIGUOUS_GAP", "output_basis"]

METHODS = ("lib", "pca", "neuron")

#: A cut is *ambiguous* when the eigenvalues on its two sides lie within this factor of each
#: other: the spectrum has no gap there, so a slightly different threshold (or data) keeps a
#: different number of directions (:attr:`Dropped.ambiguous`).
AMBIGUOUS_GAP = 10.0


def _as_float(value) -> float:
    """A threshold's value as a float; :class:`~tl_degen.errors.TLDegenError` for a bool or
    anything that is not a real number."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TLDegenError(f"threshold must be a number, got {value!r}")
    return float(value)


def cut_gap(values: Tensor, keep: Tensor, cutoff: float) -> float:
    """Smallest kept over largest dropped value (over ``cutoff`` when nothing is dropped);
    ``inf`` when there is nothing below."""
    kept, dropped = values[keep], values[~keep]
    low = float(kept.min()) if kept.numel() else 0.0
    high = float(dropped.max()) if dropped.numel() else float(cutoff)
    return float("inf") if high <= 0 else low / high


@dataclass(frozen=True)
class Threshold:
    """Which eigenvalues count as zero (DESIGN.md §4 step 10).

    For LIB the threshold acts on Λ, whose values do not depend on how a site is
    parameterised: ``Threshold.relative(1e-13)`` (the default) drops Λ below ``1e-13 ×`` the
    largest, ``Threshold.absolute(1e-15)`` below ``1e-15`` (the reference implementation's
    value). LIB's activation stage drops only directions null to working precision
    (:func:`numerical_null_cutoff`), whatever the threshold: any other activation cut moves
    under a reparameterisation (docs: "Precision and the cut"). PCA, which has no Λ, applies
    the threshold to the Gram eigenvalues. A bare float passed to :func:`tl_degen.fit_bases`
    means relative.

    Examples:
        >>> bases = tl_degen.fit_bases(model, tokens, ["resid_pre.0", "logits:last"],
        ...                            threshold=tl_degen.Threshold.absolute(1e-15))
        >>> bases["resid_pre.0"].dropped.jacobian_cutoff  # 1e-15
        >>> bases["resid_pre.0"].dropped.gap  # smallest kept / largest dropped eigenvalue
    """

    value: float = 1e-13
    mode: str = "relative"

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TLDegenError(f"threshold must be a number, got {self.value!r}")
        if self.mode not in ("relative", "absolute"):
            raise TLDegenError(
                f"threshold mode must be 'relative' or 'absolute', not {self.mode!r}")
        if not (0 <= self.value < float("inf")):
            raise TLDegenError(f"threshold must be a non-negative finite number, got "
                               f"{self.value}")
        if self.mode == "relative" and self.value >= 1:
            raise TLDegenError(f"a relative threshold of {self.value} drops every eigenvalue "
                               "(it is a fraction of the largest); use a small fraction such "
                               "as 1e-13, or Threshold.absolute for an absolute cutoff")

    @classmethod
    def relative(cls, value: float) -> Threshold:
        return cls(_as_float(value), "relative")

    @classmethod
    def absolute(cls, value: float) -> Threshold:
        return cls(_as_float(value), "absolute")

    @classmethod
    def coerce(cls, value: float | Threshold) -> Threshold:
        if isinstance(value, Threshold):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.relative(float(value))
        raise TLDegenError(f"threshold must be a float (relative) or a Threshold, got {value!r}")

    def cutoff(self, eigenvalues: Tensor) -> float:
        """Eigenvalues strictly above this are kept (``eigenvalues``: those the relative
        threshold refers to — the data directions, not the constant's unit eigenvalue)."""
        if self.mode == "absolute" or eigenvalues.numel() == 0:
            return self.value
        return self.value * float(eigenvalues.abs().max())

    def __str__(self) -> str:
        return f"{self.mode} {self.value:g}"


@dataclass
class Dropped:
    """What was cut at a site, and why.

    Attributes:
        activation: directions whose activation Gram eigenvalue fell below the threshold
            (degeneracy type 1: the data never varies along them).
        jacobian: directions whose Λ fell below the threshold (degeneracy type 2: nothing
            downstream depends on them).
        activation_cutoff / jacobian_cutoff: the eigenvalue cutoffs actually applied.

    Examples:
        >>> dropped = bases["resid_mid.0:last"].dropped
        >>> dropped.activation, dropped.jacobian, dropped.total  # type 1, type 2, both
        >>> print(dropped)
    """

    activation: int = 0
    jacobian: int = 0
    activation_cutoff: float = 0.0
    jacobian_cutoff: float = 0.0
    activation_gap: float = float("inf")
    jacobian_gap: float = float("inf")

    @property
    def total(self) -> int:
        return self.activation + self.jacobian

    @property
    def gap(self) -> float:
        """The narrower of the two cuts' gaps (smallest kept over largest dropped eigenvalue)."""
        return min(self.activation_gap, self.jacobian_gap)

    @property
    def ambiguous(self) -> bool:
        """No spectral gap at a cut (within :data:`AMBIGUOUS_GAP`): the number of kept
        directions depends on the threshold, not only on the model and the data."""
        return self.gap < AMBIGUOUS_GAP

    def __str__(self) -> str:
        text = (f"{self.activation} activation-null (type 1, eig < {self.activation_cutoff:.3g}), "
                f"{self.jacobian} Jacobian-null (type 2, Λ < {self.jacobian_cutoff:.3g})")
        if self.ambiguous:
            which = "Λ" if self.jacobian_gap <= self.activation_gap else "activation"
            text += f"; rank ambiguous (no gap at the {which} cut: {self.gap:.2g}×)"
        return text


@dataclass
class Whitening:
    """Output of :func:`whiten` (DESIGN.md §4 step 3)."""

    W: Tensor  # [d, k1] = Y U (unit directions, centered)
    W_pinv: Tensor  # [k1, d] = Uᵀ Y⁻¹
    R: Tensor  # [d, k1] = W D^(-1/2)
    R_pinv: Tensor  # [k1, d] = D^(1/2) Uᵀ Y⁻¹
    eigenvalues: Tensor  # [k1] kept D (constant first when centering)
    all_eigenvalues: Tensor  # [d] every eigenvalue of G, constant first, then descending
    n_dropped: int
    cutoff: float
    gap: float = float("inf")  # smallest kept / largest dropped data eigenvalue


def _centering_maps(mean: Tensor, center: bool, has_constant: bool) -> tuple[Tensor, Tensor]:
    """``Y`` with ``x Y = x̃`` and its inverse (identity when not centering)."""
    d = mean.shape[0]
    Y = torch.eye(d, dtype=torch.float64, device=mean.device)
    Y_inv = Y.clone()
    if center and has_constant:
        Y[-1, :-1] = -mean[:-1]
        Y_inv[-1, :-1] = mean[:-1]
    return Y, Y_inv


def numerical_null_cutoff(eigenvalues: Tensor, d: int, eps: float) -> float:
    """Eigenvalues at or below this are null to working precision: a singular value of the
    square-root factor below ``d·eps`` of the largest (``eps`` of the dtype the activations
    were computed in), i.e. ``D ≤ (d·eps)²·max D``. Unlike a fraction of the spectrum, this
    cut does not move under an invertible reparameterisation of the site: it removes only
    directions the data does not span at all (DESIGN.md §4 step 3)."""
    if eigenvalues.numel() == 0:
        return 0.0
    return float((d * eps) ** 2 * eigenvalues.abs().max())


def whiten(mean: Tensor, factor: Tensor, *, center: bool, has_constant: bool,
           threshold: Threshold, invariant_cut: bool = False, eps: float = 2.0**-52
           ) -> Whitening:
    """Whitening maps from a square-root factor of the (centered) Gram (§4 step 3).

    ``factor`` (``[r, d]``) satisfies ``factorᵀ factor = G``
    (:meth:`tl_degen.stats.MomentAccumulator.factor`); ``G = U D Uᵀ`` is read off its SVD
    (``D`` = squared singular values), never from ``G`` itself, so small eigenvalues keep
    their precision.

    With ``invariant_cut`` and a relative threshold (LIB's default), only directions null to
    working precision are dropped (:func:`numerical_null_cutoff`); the threshold then acts on
    Λ alone (:func:`lib_rotation`), whose values do not depend on the site's parameterisation.
    An absolute threshold cuts ``D`` itself, as the reference implementation does.
    """
    d = factor.shape[1]
    dev = factor.device
    Y, Y_inv = _centering_maps(mean, center, has_constant)
    if center and has_constant:
        # G = blockdiag(cov, 1): the constant direction is e_last with eigenvalue 1, first.
        _, sv, vh = torch.linalg.svd(factor[:, :-1], full_matrices=False)
        U = torch.zeros(d, d, dtype=torch.float64, device=dev)
        U[-1, 0] = 1.0
        U[:-1, 1:] = vh.T
        D = torch.cat([torch.ones(1, dtype=torch.float64, device=dev), sv**2])
    else:
        _, sv, vh = torch.linalg.svd(factor, full_matrices=False)
        U, D = vh.T, sv**2
    data = D[1:] if center and has_constant else D
    if invariant_cut:
        cutoff = numerical_null_cutoff(data, d, eps)
    else:
        cutoff = threshold.cutoff(data)
    keep = D > cutoff
    if center and has_constant:
        keep[0] = True
    first = int(center and has_constant)
    gap = cut_gap(D[first:], keep[first:], cutoff)
    U_k, D_k = U[:, keep], D[keep]
    W = Y @ U_k
    W_pinv = U_k.T @ Y_inv
    return Whitening(W=W, W_pinv=W_pinv, R=W / D_k.sqrt(), R_pinv=D_k.sqrt()[:, None] * W_pinv,
                     eigenvalues=D_k, all_eigenvalues=D, n_dropped=int((~keep).sum()),
                     cutoff=cutoff, gap=gap)


class Rotation(NamedTuple):
    """Output of :func:`lib_rotation` (DESIGN.md §4 steps 5-6); a tuple in this order."""

    C: Tensor  # [d, k] = R V_k Λ_k^(1/2)
    C_pinv: Tensor  # [k, d] = Λ_k^(-1/2) V_kᵀ R⁺
    eigenvalues: Tensor  # [k] kept Λ (constant first when it is kept apart)
    all_eigenvalues: Tensor  # [k1] every Λ before truncation
    n_dropped: int
    cutoff: float
    gap: float  # smallest kept / largest dropped Λ (:func:`cut_gap`)


def lib_rotation(wh: Whitening, jacobian_factor: Tensor, jacobian_gram: Tensor | None = None,
                 *, constant_first: bool, threshold: Threshold) -> Rotation:
    """LIB rotation and scaling (§4 steps 5-6).

    ``M = R⁺ M′ R⁺ᵀ`` with ``M′ = FᵀF + G`` (``jacobian_factor`` ``F``, ``[r, d]``, and the
    formed part ``jacobian_gram`` ``G`` or ``None``,
    :meth:`tl_degen.stats.GramAccumulator.parts`). When ``M′`` comes as a factor only,
    ``Λ`` and ``V`` are the squared singular values and right singular vectors of
    ``B = F R⁺ᵀ`` (``M = BᵀB``), whose small values keep their precision; otherwise ``M`` is
    formed and eigendecomposed. The constant direction (first, when ``constant_first``) stays
    unrotated with ``Λ_0 = M[0, 0]``; the rest is decomposed, descending.

    Returns a :class:`Rotation`: ``C, C⁺, Λ`` (kept), all ``Λ`` before truncation, the
    number dropped, the cutoff and the gap at the cut (:func:`cut_gap`).
    """
    B = jacobian_factor @ wh.R_pinv.T  # [r, k1]
    k1 = B.shape[1]
    first = int(constant_first)
    if jacobian_gram is None:
        rest = B[:, first:]
        short = rest.shape[0] < rest.shape[1]  # fewer rows than directions: M has zeros
        _, sv, vh = torch.linalg.svd(rest, full_matrices=short)
        evals = torch.cat([sv**2, sv.new_zeros(vh.shape[0] - sv.shape[0])])
        evecs = vh.T
        lam0 = (B[:, :1] ** 2).sum(0) if constant_first else None
    else:
        M = wh.R_pinv @ jacobian_gram @ wh.R_pinv.T + B.T @ B
        M = (M + M.T) / 2
        evals, evecs = torch.linalg.eigh(M[first:, first:])
        evals, order = evals.abs().sort(descending=True)
        evecs = evecs[:, order]
        lam0 = M[:1, 0].abs() if constant_first else None
    V = torch.zeros(k1, k1, dtype=torch.float64, device=B.device)
    V[first:, first:] = evecs
    if constant_first:
        V[0, 0] = 1.0
        lam = torch.cat([lam0, evals])
    else:
        lam = evals
    cutoff = threshold.cutoff(lam)
    keep = lam > cutoff
    if constant_first:
        keep[0] = bool(lam[0] > 0)
    rest = lam[first:]
    if rest.numel() and not (rest > 0).any():
        raise SiteError(
            "no direction of this site influences the next one (every Λ is zero): the next "
            "site's positions cannot see this site's positions (causal attention, or a "
            "per-position section with no position in common); choose positions that can")
    V_k, lam_k = V[:, keep], lam[keep]
    C = wh.R @ V_k * lam_k.sqrt()
    C_pinv = (V_k.T @ wh.R_pinv) / lam_k.sqrt()[:, None]
    return Rotation(C=C, C_pinv=C_pinv, eigenvalues=lam_k, all_eigenvalues=lam,
                    n_dropped=int((~keep).sum()), cutoff=cutoff,
                    gap=cut_gap(lam[first:], keep[first:], cutoff))


@dataclass
class InteractionBasis(Serialisable):
    """A basis for one site.

    Attributes:
        site: the :class:`~tl_degen.sites.Site`.
        method: ``"lib"``, ``"pca"`` or ``"neuron"``.
        C: ``[d_site, k]``: coordinates are ``x̂ = x C`` (``d_site`` includes the constant).
        C_pinv: ``[k, d_site]``: ``x̂ C⁺`` maps coordinates back; ``x C C⁺`` projects ``x``.
        eigenvalues: ``[k]``: Λ for LIB (the second moment of each coordinate and the
            Jacobian-weighted importance), Gram eigenvalues for PCA, raw second moments for
            neuron; column order of ``C``.
        mean: ``[d_site]`` data mean (constant entry 1).
        gram: ``[d_site, d_site]`` the (centered if ``center``) activation Gram. For the
            logits of a large vocabulary (``C = Q``, their factor space,
            :mod:`tl_degen.sections.unembed`) it stays in coordinates, ``[k, k]``: the
            vocabulary Gram is ``C gram C⁺``, never formed.
        gram_eigenvalues: ``[d_site]`` every Gram eigenvalue before truncation, descending
            (constant first when centering); ``[k]`` with a coordinate ``gram``.
        lambda_all: LIB only: every Λ before truncation.
        dropped: what was cut and why (:class:`Dropped`).
        center: whether the data was centered.
        n_samples: number of sequences the statistics were computed on.
        jacobian_gram_error: for stochastic fits, the relative standard error of the
            estimated Jacobian Gram (``‖SE‖_F / ‖M′‖_F``); ``0.0`` when it was exact.

    ``to_dict()`` / ``from_dict(d)`` / ``save(path)`` / ``load(path)`` round-trip it
    (:class:`tl_degen.io.Serialisable`); the dict holds the attributes above with ``site``
    as its name, ``dropped`` as a dict of :class:`Dropped`'s fields and the tensors as they are
    (``lambda_all`` may be ``None``).

    Examples:
        >>> basis = bases["resid_mid.0:last"]
        >>> acts = tl_degen.site_activations(model, tokens, basis.site)  # [batch, 1, d_site]
        >>> coords = basis.to_coords(acts)  # [batch, 1, k]
        >>> projected = basis.from_coords(coords)  # [batch, 1, d_site]
    """

    site: Site
    method: str
    C: Float[Tensor, "d_site k"]
    C_pinv: Float[Tensor, "k d_site"]
    eigenvalues: Float[Tensor, " k"]
    mean: Float[Tensor, " d_site"]
    gram: Float[Tensor, "d_site d_site"]
    gram_eigenvalues: Float[Tensor, " d_site"]
    dropped: Dropped = field(default_factory=Dropped)
    center: bool = True
    n_samples: int = 0
    lambda_all: Tensor | None = None
    jacobian_gram_error: float | None = None

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"site": self.site.name, "method": self.method, "C": self.C,
                "C_pinv": self.C_pinv, "eigenvalues": self.eigenvalues, "mean": self.mean,
                "gram": self.gram, "gram_eigenvalues": self.gram_eigenvalues,
                "dropped": asdict(self.dropped), "center": self.center,
                "n_samples": self.n_samples, "lambda_all": self.lambda_all,
                "jacobian_gram_error": self.jacobian_gram_error}

    @classmethod
    def from_dict(cls, d: dict) -> InteractionBasis:
        """Rebuild from :meth:`to_dict` (tensors may also be nested lists)."""
        from tl_degen import checks

        tensors = ("C", "C_pinv", "eigenvalues", "mean", "gram", "gram_eigenvalues")
        d = dict(checks.fields("InteractionBasis.from_dict", d,
                               ("site", "method", "dropped") + tensors))
        for f in tensors:
            d[f] = as_tensor(d[f])
        if d.get("lambda_all") is not None:
            d["lambda_all"] = as_tensor(d["lambda_all"])
        return cls(**{**d, "site": Site.parse(d["site"]), "dropped": Dropped(**d["dropped"])})

    @property
    def d_site(self) -> int:
        """Site dimension including the constant coordinate."""
        return self.C.shape[0]

    @property
    def k(self) -> int:
        """Number of kept directions."""
        return self.C.shape[1]

    @property
    def has_constant(self) -> bool:
        return self.site.has_constant

    def _with_constant(self, acts: Tensor) -> Tensor:
        d = self.d_site
        if not isinstance(acts, Tensor) or acts.dim() == 0:
            raise BasisMismatchError(
                f"expected site vectors [..., {d}] (or [..., {d - 1}] without the constant) for "
                f"{self.site.name!r}, got {type(acts).__name__}"
                + (" of shape ()" if isinstance(acts, Tensor) else ""))
        if acts.shape[-1] == d:
            return acts
        if self.has_constant and acts.shape[-1] == d - 1:
            return torch.cat([acts, torch.ones_like(acts[..., :1])], dim=-1)
        raise BasisMismatchError(
            f"activations of size {acts.shape[-1]} do not fit site {self.site.name!r} "
            f"(size {d} with the constant coordinate, {d - 1} without); was this basis fitted "
            "on another model or site?")

    def to_coords(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... k"]:
        """Basis coordinates ``x̂ = x C`` of site vectors (with or without the constant)."""
        acts = self._with_constant(acts)
        return acts.to(self.C.dtype) @ self.C.to(acts.device)

    def from_coords(self, coords: Float[Tensor, "... k"]) -> Float[Tensor, "... d_site"]:
        """Site vectors ``x̂ C⁺`` (constant coordinate included) from basis coordinates."""
        if not isinstance(coords, Tensor) or coords.dim() == 0 or coords.shape[-1] != self.k:
            got = (coords.shape[-1] if isinstance(coords, Tensor) and coords.dim()
                   else f"{type(coords).__name__} {tuple(getattr(coords, 'shape', ()))}")
            raise BasisMismatchError(f"expected {self.k} coordinates for {self.site.name!r}, "
                                     f"got {got}")
        return coords.to(self.C_pinv.dtype) @ self.C_pinv.to(coords.device)

    def __repr__(self) -> str:
        top = ", ".join(f"{v:.4g}" for v in self.eigenvalues[:3].tolist())
        return (f"InteractionBasis({self.site.name!r}, method={self.method!r}, "
                f"d_site={self.d_site}, kept={self.k}, top=[{top}], dropped: {self.dropped})")


def output_basis(basis: InteractionBasis) -> Float[Tensor, "d_site k"] | None:
    """What a section into this site differentiates into: ``None`` for the raw outputs (the
    logits of a small vocabulary, identity basis), else ``C`` (for the logits of a large
    vocabulary, their factor space ``Q``: :mod:`tl_degen.sections.unembed`)."""
    if basis.site.kind == "logits" and basis.k == basis.d_site:
        return None
    return basis.C
