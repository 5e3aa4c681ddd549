"""The output end of the model: the logits at vocabulary scale, and the final norm and
unembedding in closed form (DESIGN.md §4 steps 4 and 8).

**The logits' factor space.** The logits are ``y = [n, c] B`` with ``n`` the final norm's
output (``[d]``), ``c`` the constant coordinate and ``B = [W_U; b_U]`` (``[d + 1, V]``). They
span at most ``d + 1`` of the ``V`` vocabulary directions: with the thin SVD
``Bᵀ = Q S Pᵀ`` (zero singular values dropped; ``Q``: ``[V, r]``, orthonormal columns, the
unembedding's own basis, by descending singular value), ``y = (y Q) Qᵀ`` exactly. So a
vocabulary-scale logits site keeps its statistics in the ``r`` coordinates ``ŷ = y Q``
(:func:`logit_factor`), never a ``V × V`` matrix, and its basis is ``C = Q``, ``C⁺ = Qᵀ``
(:class:`~tl_degen.basis.InteractionBasis`). Every Jacobian into the logits lies in that
span, so ``Σ J Q Qᵀ Jᵀ = Σ J Jᵀ``: the Jacobian Gram into the raw logits is computed exactly
through ``Q`` (``r`` output directions instead of ``V``), and the edges into the logits'
coordinates hold the same total per input direction as edges into every token would.

**The final norm and unembedding**, ``resid_post.(n_layers-1) → logits``
(:class:`UnembedSection`). With ``x̄ = [x, c]`` the input row, LayerNorm
``n = (x − x̄̄)/σ ∘ w + c b`` (``σ² = mean((x − x̄̄)²) + eps``; RMSNorm: no centring, no bias),
the Jacobian of ``[n, c]`` with respect to ``x̄`` averaged over the integration rule (points
``α x̄``, weights ``w_α``) is, in the row convention (``dz = dx̄ J``)::

    J̄ = [[κ A − β u gᵀ, 0],      A = P diag(w) (LayerNorm, P = I − 11ᵀ/d) or diag(w) (RMSNorm)
         [ω b,          ω]],     u = x − x̄̄ (RMSNorm: x), g = u ∘ w / d,
    κ = Σ w_α / σ_α,  β = Σ w_α α² / σ_α³,  ω = Σ w_α,  σ_α² = α² mean(u²) + eps,

the identity minus a rank-1 term per token, scaled. The Jacobian Gram into the output basis
``K`` is ``Σ J̄ H J̄ᵀ`` with ``H = B K Kᵀ Bᵀ`` (``[d + 1, d + 1]``; ``B Bᵀ`` for the raw
logits) summed in ``O(N d²)``; the edges ``A = diag(h) C⁺ J̄ B K`` are formed row by row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.errors import SiteError
from tl_degen.sections.attention import Norm
from tl_degen.sections.mlp import PositionwiseSection
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["FACTOR_VOCAB", "LogitFactor", "logit_factor", "statistics_dim", "UnembedSection"]

#: A logits site keeps its statistics in the factor space when the vocabulary is larger than
#: ``d_model + 1`` and than this; smaller vocabularies keep one node per token (the identity
#: basis, as the reference does).
FACTOR_VOCAB = 4096

#: Vocabulary columns converted to float64 at a time when the unembedding meets an output
#: basis (``B K``).
VOCAB_BLOCK = 8192


class LogitFactor(NamedTuple):
    """The logits' factor space (module docstring): ``Q`` (``[V, r]``, orthonormal columns)
    and ``R`` (``[r, d + 1]``) with ``[W_U; b_U]ᵀ = Q R``, both float64: the coordinates of
    logits ``y`` are ``y Q = [n, c] Rᵀ``."""

    Q: Float[Tensor, "vocab r"]
    R: Float[Tensor, "r d_plus_1"]

    @property
    def r(self) -> int:
        return self.Q.shape[1]

    def coordinates(self, logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "... r"]:
        """``y Q`` in float64."""
        return logits.double() @ self.Q.to(logits.device)


def unembedding(adapter: Adapter, dtype: torch.dtype = torch.float64
                ) -> Float[Tensor, "d_plus_1 vocab"] | None:
    """``[W_U; b_U]`` of the model in ``dtype`` (formed in it: a vocabulary-scale matrix is
    never copied through another dtype), or ``None`` where the model exposes no unembedding
    weights."""
    try:
        unembed = adapter.model.unembed
        W_U = unembed.W_U.detach()
        b_U = getattr(unembed, "b_U", None)
    except AttributeError:
        return None
    b_U = torch.zeros_like(W_U[0]) if b_U is None else b_U.detach()
    return torch.cat([W_U.to(dtype), b_U[None].to(dtype)])


def logit_factor(adapter: Adapter) -> LogitFactor | None:
    """The logits' factor space where the vocabulary is larger than ``d_model + 1`` and
    :data:`FACTOR_VOCAB` (else ``None``: the logits keep the identity basis, one node per
    token, as the reference does).

    Raises:
        SiteError: a vocabulary-scale model whose logits do not lie in a ``d_model + 1``
            space (output soft-capping) or whose unembedding weights cannot be read.
    """
    arch = adapter.arch
    if arch.d_vocab_out <= max(arch.d_model + 1, FACTOR_VOCAB):
        return None
    if arch.output_logits_soft_cap is not None:
        raise SiteError(
            f"the logits of this model are soft-capped, so they do not lie in a "
            f"{arch.d_model + 1}-dimensional space and a site over its {arch.d_vocab_out} "
            f"logits would need {arch.d_vocab_out}² statistics; end the sites at "
            f"'resid_post.{arch.n_layers - 1}' (its basis is then fitted against the raw logits)")
    B = unembedding(adapter)
    if B is None:
        raise SiteError("cannot read the unembedding weights (model.unembed.W_U) that a "
                        "logits site of a large vocabulary is computed through; end the sites "
                        f"at 'resid_post.{arch.n_layers - 1}'")
    U, S, Vh = _left_svd(B.to(adapter.device))
    keep = S > S[0] * max(B.shape) * torch.finfo(torch.float64).eps
    if not bool(keep.all()):  # else U as it is: no copy of a [V, r] matrix
        U, S, Vh = U[:, keep].contiguous(), S[keep], Vh[keep]
    return LogitFactor(Q=U, R=(S[:, None] * Vh).contiguous())


#: How far from orthonormal (``‖(UᵀU − I) v‖ / ‖v‖`` on random ``v``) the Gram route's ``U``
#: may be before :func:`_left_svd` takes the SVD instead.
ORTHONORMAL_TOL = 1e-11


def _left_svd(B: Float[Tensor, "d1 vocab"]) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``Bᵀ = U diag(S) Vh`` (float64, ``S`` descending) of a wide ``B``, for
    the singular values :func:`logit_factor` keeps, through the ``[d1, d1]`` Gram:
    ``B Bᵀ = Vhᵀ S² Vh`` by eigendecomposition and ``U = Bᵀ Vhᵀ S⁻¹``, three products at
    the matmul rate where LAPACK's SVD of the ``[V, d1]`` matrix runs at a fraction of it.

    The Gram squares the condition number, so it is used only where every eigenvalue is
    either well resolved (``S² ≥ 10⁻⁴ S₀²``) or zero to working precision
    (``|S²| ≤ 10·d1·eps·S₀²``, e.g. the row of an absent ``b_U``) with ``‖Bᵀv‖`` below the
    factor's cut (so the SVD's cut would drop it too), and ``U`` is then checked to be
    orthonormal to :data:`ORTHONORMAL_TOL` on random vectors; otherwise the SVD is taken."""
    d1, eps = B.shape[0], torch.finfo(B.dtype).eps
    lam, V = torch.linalg.eigh(B @ B.T)
    lam, V = lam.flip(0), V.flip(1)
    top = float(lam[0])
    resolved = lam >= 1e-4 * top
    null = lam.abs() <= 10 * d1 * eps * top
    # a direction null in the Gram may still have a singular value up to ~1e-6 of the
    # largest, which the SVD's cut would keep: measured directly, ‖Bᵀv‖ must be below it
    cut = max(B.shape) * eps * max(top, 0.0) ** 0.5
    if top > 0 and bool((resolved | null).all()) and (
            not bool(null.any()) or float((B.T @ V[:, null]).norm(dim=0).max()) <= cut):
        S = lam[resolved].sqrt()
        Vk = V[:, resolved]
        U = B.T @ (Vk / S)  # scaled before the product: no second [V, r] matrix
        v = torch.randn(U.shape[1], 2, generator=torch.Generator().manual_seed(0),
                        dtype=U.dtype).to(U.device)
        if float((U.T @ (U @ v) - v).norm() / v.norm()) <= ORTHONORMAL_TOL:
            return U, S, Vk.T
    return torch.linalg.svd(B.T, full_matrices=False)


def statistics_dim(adapter: Adapter, site: Site, factor: LogitFactor | None = None) -> int:
    """The dimension a site's statistics are kept in: the site vector's (constant
    included), or for vocabulary-scale logits their factor space's ``r``
    (``factor``: :func:`logit_factor`, computed here when not given)."""
    if site.kind == "logits":
        factor = factor if factor is not None else logit_factor(adapter)
        if factor is not None:
            return factor.r
    return adapter.site_dim(site) + int(site.has_constant)


class UnembedSection(PositionwiseSection):
    """``resid_post.(n_layers-1) → logits`` through the final LayerNorm/RMSNorm and the
    unembedding, in closed form (module docstring).

    Args:
        norm: the final normalisation (``ln_final``).
        B: ``[W_U; b_U]``, ``[d + 1, V]`` in the dtype of the passes.
    """

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 norm: Norm, B: Float[Tensor, "d_plus_1 vocab"]):
        super().__init__(adapter, in_site, out_site, n_pos, B.device)
        self.norm, self.B = norm, B
        d = B.shape[0] - 1
        dev = B.device
        w = (torch.ones(d, dtype=torch.float64, device=dev) if norm.w is None
             else norm.w.double())
        A = torch.diag(w)
        if not norm.rms:
            A = A - w[None, :] / d  # P diag(w)
        self._F = torch.cat([A, torch.zeros(d, 1, dtype=torch.float64, device=dev)], 1)
        bias = (torch.zeros(d, dtype=torch.float64, device=dev) if norm.b is None
                else norm.b.double())
        self._e = torch.cat([bias, torch.ones(1, dtype=torch.float64, device=dev)])
        self._w = w
        self._cache: tuple[Tensor | None, Tensor] | None = None

    def forward_rows(self, x: Tensor) -> Tensor:
        xr = x[:, self._in_rows]
        v, c = xr[..., :-1], xr[..., -1:]
        if not self.norm.rms:
            v = v - v.mean(-1, keepdim=True)
        n = v / (v.pow(2).mean(-1, keepdim=True) + self.norm.eps).sqrt()
        if self.norm.w is not None:
            n = n * self.norm.w.to(x.dtype)
        if self.norm.b is not None:
            n = n + c * self.norm.b.to(x.dtype)
        return n @ self.B[:-1].to(x.dtype) + c * self.B[-1].to(x.dtype)

    # ------------------------------------------------------------------ per-row Jacobian
    def _scales(self, x: Tensor, alphas: list[float], weights: list[float]
                ) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(u, κ, β, ω)`` of the rows the section reads (module docstring), float64."""
        v = self._rows(x)[:, :-1].double()
        u = v if self.norm.rms else v - v.mean(-1, keepdim=True)
        ms = u.pow(2).mean(-1)
        kappa = torch.zeros_like(ms)
        beta = torch.zeros_like(ms)
        for a, wa in zip(alphas, weights):
            sigma = (a * a * ms + self.norm.eps).sqrt()
            kappa += wa / sigma
            beta += wa * a * a / sigma**3
        return u, kappa, beta, float(sum(weights))

    def _out_product(self, out_basis: Tensor | None) -> Tensor:
        """``B K`` in float64 (``B`` for the raw logits), formed once per output basis."""
        if self._cache is not None and self._cache[0] is out_basis:
            return self._cache[1]
        if out_basis is None:
            BK = self.B.double()
        else:  # over vocabulary blocks: never a float64 copy of the whole unembedding
            BK = torch.zeros(self.B.shape[0], out_basis.shape[1], dtype=torch.float64,
                             device=self.B.device)
            for v in range(0, self.B.shape[1], VOCAB_BLOCK):
                BK += self.B[:, v:v + VOCAB_BLOCK].double() @ out_basis[v:v + VOCAB_BLOCK].double()
        self._cache = (out_basis, BK)
        return BK

    # ------------------------------------------------------------------ the interface
    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        BK = self._out_product(out_basis)
        H = BK @ BK.T  # [d + 1, d + 1]
        d = H.shape[0] - 1
        u, kappa, beta, omega = self._scales(x, alphas, weights)
        FH = self._F @ H  # [d, d + 1]
        g = u * self._w / d  # [n, d]
        hq = g @ H[:d]  # rows of H q: [n, d + 1]
        a = hq @ self._F.T  # rows of F H q: [n, d]
        s = (hq[:, :d] * g).sum(-1)  # qᵀ H q
        t = hq @ self._e  # e H q
        kb = kappa * beta
        top = (kappa.square().sum() * (FH @ self._F.T) - (u * kb[:, None]).T @ a
               - a.T @ (u * kb[:, None]) + (u * (beta.square() * s)[:, None]).T @ u)
        side = omega * (kappa.sum() * (FH @ self._e) - u.T @ (beta * t))
        G = torch.empty(d + 1, d + 1, dtype=torch.float64, device=H.device)
        G[:d, :d] = top
        G[:d, d] = side
        G[d, :d] = side
        G[d, d] = u.shape[0] * omega**2 * (self._e @ H @ self._e)
        acc.add_matrix(G)
        acc.add_count(x.shape[0] * x.shape[1])

    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None) -> Tensor:
        BK = self._out_product(out_basis)  # [d + 1, k_out]
        d = BK.shape[0] - 1
        u, kappa, beta, omega = self._scales(x_eval, alphas, weights)
        Cp = C_pinv.double()
        P1 = Cp[:, :d] @ (self._F @ BK)  # [k_in, k_out]
        P2 = omega * Cp[:, d:] * (self._e @ BK)[None, :]
        hr = h[:, self._in_rows].reshape(-1, h.shape[-1]).double()  # [n, k_in]
        v = u @ Cp[:, :d].T  # C⁺ u: [n, k_in]
        z = (u * self._w / d) @ BK[:d]  # qᵀ B K: [n, k_out]
        k_in, k_out = P1.shape
        out = torch.zeros(k_in, k_out, dtype=torch.float64, device=P1.device)
        chunk = max(1, 2**24 // max(1, k_in * k_out))
        for s in range(0, hr.shape[0], chunk):
            e = slice(s, s + chunk)
            A = (kappa[e, None, None] * P1 + P2
                 - (beta[e, None] * v[e])[:, :, None] * z[e, None, :])
            out += (hr[e, :, None] * A).square().sum(0)
        return out.T

