"""Per-site bases: LIB (interaction basis), PCA and neuron (DESIGN.md §4 steps 3-7, 10).

Conventions (pinned here, relied on everywhere):

* Row vectors. A site vector ``x`` (``[d]``, constant coordinate last) has coordinates
  ``x̂ = x C`` (``C``: ``[d, k]``), and ``x̂ C⁺`` (``C⁺``: ``[k, d]``) maps back.
* Columns of ``C`` are ordered constant direction first (when centering), then by
  descending eigenvalue; ``eigenvalues[j]`` belongs to column ``j``.
* Gradients transform the other way: ``∂/∂x̂ = ∂/∂x · C⁺ᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.errors import BasisMismatchError, SiteError, TLDegenError
from tl_degen.sites import Site

__all__ = ["Threshold", "Dropped", "InteractionBasis", "whiten", "lib_rotation", "METHODS"]

METHODS = ("lib", "pca", "neuron")


@dataclass(frozen=True)
class Threshold:
    """Which eigenvalues count as zero (DESIGN.md §4 step 10).

    ``Threshold.relative(1e-13)`` (the default) drops eigenvalues below ``1e-13 ×`` the
    largest one at that stage; ``Threshold.absolute(1e-15)`` drops those below ``1e-15`` (the
    reference implementation's setting, which cuts inside the float64 noise floor). A bare
    float passed to :func:`tl_degen.fit_bases` means relative.

    Examples:
        >>> bases = tl_degen.fit_bases(model, tokens, ["resid_pre.0", "logits:last"],
        ...                            threshold=tl_degen.Threshold.absolute(1e-15))
        >>> bases["resid_pre.0"].dropped.activation_cutoff  # 1e-15
    """

    value: float = 1e-13
    mode: str = "relative"

    def __post_init__(self) -> None:
        if self.mode not in ("relative", "absolute"):
            raise TLDegenError(
                f"threshold mode must be 'relative' or 'absolute', not {self.mode!r}")
        if not (self.value >= 0):
            raise TLDegenError(f"threshold must be a non-negative number, got {self.value}")

    @classmethod
    def relative(cls, value: float) -> Threshold:
        return cls(float(value), "relative")

    @classmethod
    def absolute(cls, value: float) -> Threshold:
        return cls(float(value), "absolute")

    @classmethod
    def coerce(cls, value: float | Threshold) -> Threshold:
        if isinstance(value, Threshold):
            return value
        if isinstance(value, (int, float)):
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

    @property
    def total(self) -> int:
        return self.activation + self.jacobian

    def __str__(self) -> str:
        return (f"{self.activation} activation-null (type 1, eig < {self.activation_cutoff:.3g}), "
                f"{self.jacobian} Jacobian-null (type 2, Λ < {self.jacobian_cutoff:.3g})")


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


def _centering_maps(mean: Tensor, center: bool, has_constant: bool) -> tuple[Tensor, Tensor]:
    """``Y`` with ``x Y = x̃`` and its inverse (identity when not centering)."""
    d = mean.shape[0]
    Y = torch.eye(d, dtype=torch.float64, device=mean.device)
    Y_inv = Y.clone()
    if center and has_constant:
        Y[-1, :-1] = -mean[:-1]
        Y_inv[-1, :-1] = mean[:-1]
    return Y, Y_inv


def whiten(mean: Tensor, gram: Tensor, *, center: bool, has_constant: bool,
           threshold: Threshold) -> Whitening:
    """Eigendecompose the (centered) Gram and build the whitening maps (§4 step 3)."""
    d = gram.shape[0]
    Y, Y_inv = _centering_maps(mean, center, has_constant)
    if center and has_constant:
        # G = blockdiag(cov, 1): the constant direction is e_last with eigenvalue 1, first.
        evals, evecs = torch.linalg.eigh(gram[:-1, :-1])
        evals, order = evals.abs().sort(descending=True)
        evecs = evecs[:, order]
        U = torch.zeros(d, d, dtype=torch.float64, device=gram.device)
        U[-1, 0] = 1.0
        U[:-1, 1:] = evecs
        D = torch.cat([torch.ones(1, dtype=torch.float64, device=gram.device), evals])
    else:
        evals, U = torch.linalg.eigh(gram)
        D, order = evals.abs().sort(descending=True)
        U = U[:, order]
    cutoff = threshold.cutoff(D[1:] if center and has_constant else D)
    keep = D > cutoff
    if center and has_constant:
        keep[0] = True
    U_k, D_k = U[:, keep], D[keep]
    W = Y @ U_k
    W_pinv = U_k.T @ Y_inv
    return Whitening(W=W, W_pinv=W_pinv, R=W / D_k.sqrt(), R_pinv=D_k.sqrt()[:, None] * W_pinv,
                     eigenvalues=D_k, all_eigenvalues=D, n_dropped=int((~keep).sum()),
                     cutoff=cutoff)


def lib_rotation(wh: Whitening, jacobian_gram: Tensor, *, constant_first: bool,
                 threshold: Threshold) -> tuple[Tensor, Tensor, Tensor, Tensor, int, float]:
    """LIB rotation and scaling (§4 steps 5-6).

    ``M = R⁺ M′ R⁺ᵀ``; the constant direction (first, when ``constant_first``) stays
    unrotated with ``Λ_0 = M[0, 0]``; the rest is eigendecomposed, descending.

    Returns ``C, C⁺, Λ`` (kept), all ``Λ`` before truncation, the number dropped, the cutoff.
    """
    M = wh.R_pinv @ jacobian_gram @ wh.R_pinv.T
    M = (M + M.T) / 2
    k1 = M.shape[0]
    if constant_first:
        evals, evecs = torch.linalg.eigh(M[1:, 1:])
        evals, order = evals.abs().sort(descending=True)
        V = torch.zeros(k1, k1, dtype=torch.float64, device=M.device)
        V[0, 0] = 1.0
        V[1:, 1:] = evecs[:, order]
        lam = torch.cat([M[:1, 0].abs(), evals])
    else:
        evals, evecs = torch.linalg.eigh(M)
        lam, order = evals.abs().sort(descending=True)
        V = evecs[:, order]
    cutoff = threshold.cutoff(lam)
    keep = lam > cutoff
    if constant_first:
        keep[0] = bool(lam[0] > 0)
    rest = lam[int(constant_first):]
    if rest.numel() and not (rest > 0).any():
        raise SiteError(
            "no direction of this site influences the next one (every Λ is zero): the next "
            "site's positions cannot see this site's positions (causal attention, or a "
            "per-position section with no position in common); choose positions that can")
    V_k, lam_k = V[:, keep], lam[keep]
    C = wh.R @ V_k * lam_k.sqrt()
    C_pinv = (V_k.T @ wh.R_pinv) / lam_k.sqrt()[:, None]
    return C, C_pinv, lam_k, lam, int((~keep).sum()), cutoff


@dataclass
class InteractionBasis:
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
        gram: ``[d_site, d_site]`` the (centered if ``center``) activation Gram.
        gram_eigenvalues: ``[d_site]`` every Gram eigenvalue before truncation, descending
            (constant first when centering).
        lambda_all: LIB only: every Λ before truncation.
        dropped: what was cut and why (:class:`Dropped`).
        center: whether the data was centered.
        n_samples: number of sequences the statistics were computed on.
        jacobian_gram_error: for stochastic fits, the relative standard error of the
            estimated Jacobian Gram (``‖SE‖_F / ‖M′‖_F``); ``0.0`` when it was exact.

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
        if coords.shape[-1] != self.k:
            raise BasisMismatchError(f"expected {self.k} coordinates for {self.site.name!r}, "
                                     f"got {coords.shape[-1]}")
        return coords.to(self.C_pinv.dtype) @ self.C_pinv.to(coords.device)

    def __repr__(self) -> str:
        top = ", ".join(f"{v:.4g}" for v in self.eigenvalues[:3].tolist())
        return (f"InteractionBasis({self.site.name!r}, method={self.method!r}, "
                f"d_site={self.d_site}, kept={self.k}, top=[{top}], dropped: {self.dropped})")
