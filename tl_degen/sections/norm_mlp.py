"""The MLP after a normalisation in closed form: ``resid_mid.L → resid_post.L`` through
``ln2`` (LayerNorm or RMSNorm) and an MLP (GELU, SiLU, ... or gated, SwiGLU), DESIGN.md §8.

Row vectors, constant coordinate ``c`` last. With ``x`` the residual stream of one position,
``n = norm(x) + c b_ln`` and ``ñ = [n, c]``, the block computes
``f(x̃) = [x + φ(ñ W̃) W_out + c b_out, c]``: ungated ``φ(p) = σ(p)`` with ``W̃ = [W_in; b_in]``;
gated ``φ([g, u]) = σ(g) ⊙ u`` with ``W̃ = [W̃_gate, W̃_in]`` (the units are then the ``2m``
columns ``[g, u]`` and ``W_out`` is stacked twice). In both, the derivative of ``φ`` is a
diagonal ``D`` over the units (``σ′(p)``; gated ``[σ′(g) ⊙ u, σ(g)]``), so

    J = J0 + W̃_in,t diag(D_t) Q̃,     J0 = I with J0[c, :] = [b_out, 1],  Q̃ = [W_out, 0]

and the norm's Jacobian is the identity minus a rank-2 (LayerNorm) or rank-1 (RMSNorm) term
per token: ``∂n/∂x = (1/s)(I − 11ᵀ/d − y yᵀ/d) diag(w)`` with ``y = (x − μ)/s`` (RMSNorm: no
``11ᵀ`` term, ``μ = 0``), ``s`` the norm's divisor, eps included. So, with
``W_w = diag(w) W̃[:d]``, ``v = 1ᵀ W_w``, ``b_t = yᵀ W_w``, ``β = b_ln W̃[:d] + W̃[d]``,
``e = D/s`` and ``Q = Q̃ C`` for the output basis ``C``::

    J_t C = J0 C + [W_w; 0] diag(e) Q − [1; 0] (v⊙e)Q/d + e_c (β⊙D)Q − [y; 0] (b⊙e)Q/d

— one fixed product weighted per token by ``e`` plus three rank-1 terms. Edges
(``A_t = C⁺ J_t C`` weighted by ``h``) are the GEMM of :class:`~tl_degen.sections.mlp.MLPSection`
plus the rank-1 terms per token; the Jacobian Gram ``Σ_t J_t K J_tᵀ`` is
``U (Σ_t Z_t Z_tᵀ) Uᵀ`` with ``U = [W_w; 0 | 1 | e_c | J0 C]`` fixed and ``Z_t`` the per-token
weights (``Σ_t (e_t e_tᵀ) ⊙ QQᵀ`` for the main block, as for the normalisation-free MLP), plus
the terms of ``y``. Integrated gradients evaluate every term at ``α·x̃`` and average, so the
``y`` term becomes one rank-1 term per integration point. Costs per row: edges
``k_in·k_out·m`` (the section's JVP route: ``k_in`` passes of ``≈ 4·d·m`` each, twice that
for its tangents), the Gram ``m²`` plus ``m·k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.attention import Norm
from tl_degen.sections.autograd import Pullback
from tl_degen.sections.mlp import PositionwiseSection, _act_derivative, _out_matrix
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["NormMLPSection", "NormMLPWeights"]


@dataclass
class NormMLPWeights:
    """The block's MLP half: ``act`` (σ), ``w`` = ``W̃`` ``[d + 1, m]`` (gated:
    ``[W̃_gate, W̃_in]``, ``[d + 1, 2m]``), ``w_out`` ``[m, d]``, ``b_out`` ``[d]``."""

    act: Callable[[Tensor], Tensor]
    w: Tensor
    w_out: Tensor
    b_out: Tensor
    gated: bool

    @property
    def units(self) -> int:
        """Columns of ``W̃``: ``m``, or ``2m`` gated."""
        return self.w.shape[1]


@dataclass
class _Point:
    """Per-row quantities at one integration point (float64): ``s`` ``[R]``, ``y`` ``[R, d]``
    (the normalised input, before its weight), ``D`` ``[R, units]``."""

    s: Tensor
    y: Tensor
    D: Tensor


class NormMLPSection(PositionwiseSection):
    """``resid_mid.L → resid_post.L`` through ``ln2`` and the MLP (the module docstring):
    closed-form Jacobian Gram, edges and pullbacks, at any integration rule.

    Args:
        norm: ``ln2`` (:class:`~tl_degen.sections.attention.Norm`).
        mlp: the MLP's weights (:class:`NormMLPWeights`).
    """

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 norm: Norm, mlp: NormMLPWeights):
        super().__init__(adapter, in_site, out_site, n_pos, mlp.w.device)
        self.norm, self.mlp = norm, mlp
        d = mlp.w_out.shape[1]
        self.d = d
        w = mlp.w.double()
        ln_w = (torch.ones(d, dtype=torch.float64, device=w.device) if norm.w is None
                else norm.w.double())
        ln_b = None if norm.b is None else norm.b.double()
        self._ln_w64 = ln_w
        # float64 copies of the [d, units] matrices are formed where used (_ww, _q), never
        # kept: a whole model holds one section per block
        self._v = (ln_w[:, None] * w[:d]).sum(0)  # 1ᵀ W_w
        self._beta = w[d] + (0.0 if ln_b is None else ln_b @ w[:d])
        j0 = torch.eye(d + 1, dtype=torch.float64, device=w.device)
        j0[d, :d] = mlp.b_out.double()
        self._j0 = j0

    # ------------------------------------------------------------------ forward
    def _normed(self, xs: Tensor, c: Tensor) -> Tensor:
        """``ñ = [norm(x) + c b_ln, c]`` as the model computes it."""
        N = self.norm
        d = (xs.shape[-1],)
        n = (F.rms_norm(xs, d, N.w, N.eps) if N.rms else F.layer_norm(xs, d, N.w, None, N.eps))
        if N.b is not None:
            n = n + c * N.b
        return torch.cat([n, c], dim=-1)

    def _phi(self, pre: Tensor) -> Tensor:
        if not self.mlp.gated:
            return self.mlp.act(pre)
        g, u = pre.chunk(2, dim=-1)
        return self.mlp.act(g) * u

    def forward_rows(self, x: Tensor) -> Tensor:
        xr = x[:, self._in_rows]
        xs, c = xr[..., :-1], xr[..., -1:]
        hidden = self._phi(self._normed(xs, c) @ self.mlp.w)
        out = xs + hidden @ self.mlp.w_out + c * self.mlp.b_out
        return torch.cat([out, c], dim=-1)

    # ------------------------------------------------------------------ per-row terms
    def _point(self, xr: Float[Tensor, "R d1"], alpha: float) -> _Point:
        """``s, y, D`` at ``α·x̃`` (float64)."""
        xa = alpha * xr.double()
        xs, c = xa[:, :-1], xa[:, -1:]
        mu = 0.0 if self.norm.rms else xs.mean(-1, keepdim=True)
        xc = xs - mu
        s = (xc.square().mean(-1) + self.norm.eps).sqrt()  # [R]
        y = xc / s[:, None]
        n = y * self._ln_w64 + (0.0 if self.norm.b is None else c * self.norm.b.double())
        pre = torch.cat([n, c], -1) @ self.mlp.w.double()
        if self.mlp.gated:
            g, u = pre.chunk(2, dim=-1)
            D = torch.cat([_act_derivative(self.mlp.act, g) * u, self.mlp.act(g)], -1)
        else:
            D = _act_derivative(self.mlp.act, pre)
        return _Point(s, y, D)

    def _ww(self) -> Float[Tensor, "d units"]:
        """``W_w = diag(w) W̃[:d]`` in float64."""
        return self._ln_w64[:, None] * self.mlp.w[:self.d].double()

    def _q(self, C: Float[Tensor, "d1 k"]) -> Float[Tensor, "units k"]:
        """``Q = Q̃ C`` in float64 (gated: ``W_out C`` for both halves of the units)."""
        Q = self.mlp.w_out.double() @ C[:self.d]
        return torch.cat([Q, Q]) if self.mlp.gated else Q

    def _terms(self, xr: Tensor, Q: Tensor, alphas: list[float], weights: list[float],
               ww: Tensor):
        """The per-row weights of the module docstring's form, averaged over the rule:
        ``ē = Σ w_α D/s`` ``[R, units]``, ``q1 = Σ w_α (v⊙D/s)Q/d`` and ``r = Σ w_α (β⊙D)Q``
        ``[R, k]`` (``q1`` zero for RMSNorm), and per point ``(w_α y_α, (b_α⊙D/s)Q/d)``."""
        R, d = xr.shape[0], self.d
        e = torch.zeros(R, self.mlp.units, dtype=torch.float64, device=xr.device)
        q1 = torch.zeros(R, Q.shape[1], dtype=torch.float64, device=xr.device)
        r = torch.zeros_like(q1)
        ys = []
        for alpha, wt in zip(alphas, weights):
            p = self._point(xr, alpha)
            ea = p.D / p.s[:, None]
            e += wt * ea
            r += wt * ((self._beta * p.D) @ Q)
            if not self.norm.rms:
                q1 += wt * ((self._v * ea) @ Q) / d
            b = p.y @ ww  # [R, units]: yᵀ W_w
            ys.append((wt * p.y, ((b * ea) @ Q) / d))
        return e, q1, r, ys

    # ------------------------------------------------------------------ edges
    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None) -> Tensor:
        """``A_t = C⁺ J_t C``, contracted with ``h`` without forming ``J_t``: the part
        ``Σ_m (C⁺W_w)[j,m] ē[m] Q[m,i]`` by one GEMM ``Qᵀ [k_out, m] × [m, (j, row)]`` per
        block of ``j`` (every position's rows at once), then ``C⁺J0C`` and the rank-1 terms of
        the norm and the constant added per row, squared and summed with weights ``h²``. The
        products run in the dtype of the passes, the squares and sums in float64."""
        x, d, dt = x_eval, self.d, x_eval.dtype
        C = _out_matrix(self, out_basis, torch.float64, x.device)
        Cp = C_pinv.double()
        Q = self._q(C)  # [units, k_out]
        ww = self._ww()
        M0 = Cp @ self._j0 @ C  # [k_in, k_out]
        P = Cp[:, :d] @ ww  # [k_in, units]
        k_in, (m, k_out) = P.shape[0], Q.shape
        xr = self._rows(x)  # [R, d + 1], rows (sample, position)
        R = xr.shape[0]
        h2 = h[:, self._in_rows].reshape(R, k_in).double().square().T  # [k_in, R]
        e, q1, r, ys = self._terms(xr, Q, alphas, weights, ww)
        e_ = e.to(dt)  # [R, m]
        # rank-1 terms per row: Σ_l U_l[j, row] R_l[row, i], as [n_l, k_in, R], [n_l, R, k_out]
        left = [Cp[:, d:d + 1].expand(k_in, R)]
        right = [r]
        if not self.norm.rms:
            left.append(-Cp[:, :d].sum(1, keepdim=True).expand(k_in, R))  # −C⁺1
            right.append(q1)
        for wy, q2 in ys:
            left.append(-(Cp[:, :d] @ wy.T))  # −C⁺y per row, weighted
            right.append(q2)
        left, right = torch.stack(left).to(dt), torch.stack(right).to(dt)
        Q_, M0_, P_ = Q.to(dt), M0.to(dt), P.to(dt)
        E = torch.zeros(k_in, k_out, dtype=torch.float64, device=x.device)
        # A[(j, row), i] = ((C⁺W_w)[j] ⊙ ē[row]) Q: one GEMM of inner size m per block of j,
        # its left factor built per block (m·R floats per j: fewer than the k_out·m of a
        # [(j, i), m] factor when R < k_out)
        j_block = max(1, min(k_in, 2**22 // max(1, m * R)))
        PE = torch.empty(j_block, R, m, dtype=dt, device=x.device)
        for j0 in range(0, k_in, j_block):
            js = slice(j0, min(k_in, j0 + j_block))
            nj = js.stop - js.start
            pe = PE[:nj]
            torch.mul(P_[js, None, :], e_[None], out=pe)
            A = (pe.view(nj * R, m) @ Q_).view(nj, R, k_out)
            A += M0_[js, None, :]
            for lf, rt in zip(left, right):
                A.addcmul_(lf[js, :, None], rt[None])
            A2 = A.double().square_()
            E[js] += torch.bmm(h2[js, None, :], A2)[:, 0]
        return E.T

    # ------------------------------------------------------------------ Jacobian Gram
    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        """``Σ_t J_t C Cᵀ J_tᵀ`` with ``J_t C = U Z_t + Y_t`` (the module docstring), as
        ``U′ S U′ᵀ`` with ``U′ = [U | I]`` fixed for the output basis and
        ``S = [[Σ Z Zᵀ, X], [Xᵀ, Σ Y Yᵀ]]``, ``X = Σ_t Z_t Y_tᵀ``: each batch adds its ``S``
        to the accumulator's running one (:meth:`~tl_degen.stats.GramAccumulator.factored_sum`,
        which also keeps ``U′``, ``Q`` and ``QQᵀ`` for the pass), and ``U′ S U′ᵀ`` is formed
        once per pass, not per batch."""
        S, (U, Q, QQ) = acc.factored_sum((self, out_basis),
                                         lambda: self._gram_factors(out_basis), _finish_gram)
        self._add_gram_terms(S, self._rows(x), Q, U[:self.d, :Q.shape[0]], alphas, weights)
        acc.add_count(x.shape[0] * x.shape[1])

    def _gram_factors(self, out_basis: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``U′ = [W_w; 0 | 1_x | e_c | J0 C | I]`` ``[d + 1, m + 2 + k + d + 1]``,
        ``Q = Q̃ C`` and ``Q Qᵀ`` (float64) for the output basis (the accumulator keeps them
        for one pass over the batches)."""
        d, f64 = self.d, torch.float64
        dev = self._v.device
        C = _out_matrix(self, out_basis, f64, dev)
        Q = self._q(C)  # [m, k]
        m, k = Q.shape
        U = torch.zeros(d + 1, m + 2 + k + d + 1, dtype=f64, device=dev)
        U[:d, :m] = self._ww()
        U[:d, m] = 1.0
        U[d, m + 1] = 1.0
        U[:, m + 2:m + 2 + k] = self._j0 @ C
        U[:, m + 2 + k:] = torch.eye(d + 1, dtype=f64, device=dev)
        return U, Q, Q @ Q.T

    def _add_gram_terms(self, S: Tensor, xr: Float[Tensor, "R d1"], Q: Tensor, ww: Tensor,
                        alphas: list[float], weights: list[float]) -> None:
        """Add this batch's symmetric ``S`` (see :meth:`add_jacobian_gram`) into ``S``:
        ``Z_t = [diag(ē) Q; −q1ᵀ; rᵀ; I_k]``, ``Y_t = −Σ_α (w_α ỹ_α) q2_αᵀ``. Only the
        diagonal blocks and the blocks above them are added, each product straight into
        ``S``; the units' block ``Σ_t diag(ē) Q Qᵀ diag(ē) = (Σ_t ē ēᵀ) ⊙ QQᵀ`` is added as
        ``Σ_t ē ēᵀ``. :func:`_finish_gram` takes the product with ``QQᵀ`` and fills the
        blocks below the diagonal once, on the sum."""
        d = self.d
        m, k = Q.shape
        n = m + 2 + k
        R = xr.shape[0]
        e, q1, r, ys = self._terms(xr, Q, alphas, weights, ww)
        # Σ Z Zᵀ: the units' block (before ⊙ QQᵀ), then the blocks right of it
        S[:m, :m].addmm_(e.T, e)
        esum = e.sum(0)
        cols = torch.stack([-(e * (q1 @ Q.T)).sum(0), (e * (r @ Q.T)).sum(0)], 1)  # [m, 2]
        S[:m, m:m + 2] += cols
        S[:m, m + 2:n].addcmul_(esum[:, None], Q)
        small = torch.stack([q1, -r], 1)  # [R, 2, k]: the rows −q1ᵀ, rᵀ up to sign
        S[m:m + 2, m:m + 2] += torch.stack([torch.stack([q1.square().sum(), -(q1 * r).sum()]),
                                            torch.stack([-(q1 * r).sum(), r.square().sum()])])
        S[m:m + 2, m + 2:n] -= small.sum(0)  # [2, k]: −Σ q1, Σ r
        S[m + 2:n, m + 2:n].diagonal().add_(R)
        # X = Σ_t Z_t Y_tᵀ and Σ Y Yᵀ
        ywt = torch.stack([torch.cat([wy, wy.new_zeros(R, 1)], 1) for wy, _ in ys], 1)
        q2 = torch.stack([q for _, q in ys], 1)  # [R, n_α, k]
        Zq = torch.cat([e[:, None] * (q2 @ Q.T), -(q2 * q1[:, None]).sum(-1, keepdim=True),
                        (q2 * r[:, None]).sum(-1, keepdim=True), q2], -1)  # [R, n_α, n]
        yw = ywt.reshape(-1, d + 1)
        S[:n, n:].addmm_(Zq.reshape(-1, n).T, yw, alpha=-1.0)
        Gq = q2 @ q2.transpose(1, 2)  # [R, n_α, n_α]
        S[n:, n:].addmm_(yw.T, (Gq @ ywt).reshape(-1, d + 1))

    # ------------------------------------------------------------------ pullbacks
    def _jc(self, xr: Tensor, C: Tensor, Q: Tensor, ww: Tensor, alphas: list[float],
            weights: list[float]) -> Float[Tensor, "R d1 k"]:
        """``J̄_t C`` of each row, formed (float64; ``Q = Q̃ C`` and ``W_w`` given)."""
        d = self.d
        e, q1, r, ys = self._terms(xr, Q, alphas, weights, ww)
        g = (self._j0 @ C).expand(xr.shape[0], -1, -1).clone()
        g[:, :d] += ww @ (e[:, :, None] * Q)  # [d, m] @ [b, m, k]: W_w diag(ē) Q
        g[:, :d] -= q1[:, None, :]
        g[:, d] += r
        for wy, q2 in ys:
            g[:, :d] -= wy[:, :, None] * q2[:, None, :]
        return g

    def pullbacks(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                  weights: list[float], tokens: Tensor | None = None,
                  chunk: int = 64) -> Iterator[Pullback]:
        """Per output position, ``J̄_t C`` formed for ``chunk`` samples' worth of
        ``[d + 1, k]`` blocks at a time: with few directions (a narrow ``out_basis``) one
        block holds several positions, or all of them."""
        C = _out_matrix(self, out_basis, torch.float64, x.device)
        Q, ww = self._q(C), self._ww()
        dirs = torch.arange(C.shape[1], device=x.device)
        pairs = list(zip(self.out_rows, self.in_rows))
        d1 = self.d + 1
        budget = chunk * d1 * d1  # float64 entries of J̄C held at once
        per = max(1, budget // (d1 * C.shape[1]))  # rows (sample, position) per block
        n_samples = max(1, min(x.shape[0], per))
        n_pos = max(1, per // n_samples)
        for start in range(0, x.shape[0], n_samples):
            xb = x[start:start + n_samples]
            b = xb.shape[0]
            for p0 in range(0, len(pairs), n_pos):
                group = pairs[p0:p0 + n_pos]
                rows = xb[:, [r for _, r in group]].reshape(b * len(group), -1)
                g = self._jc(rows, C, Q, ww, alphas, weights).to(x.dtype)
                g = g.view(b, len(group), *g.shape[1:])
                for i, (t, r) in enumerate(group):
                    yield Pullback(slice(start, start + b), [r], t, dirs, g[:, i:i + 1])


def _finish_gram(S: Tensor, factors: tuple[Tensor, ...]) -> None:
    """Finish a summed ``S`` of :meth:`NormMLPSection.add_jacobian_gram`, which holds its
    diagonal blocks and the blocks above them (:meth:`NormMLPSection._add_gram_terms`): the
    units' block ``Σ_t ē ēᵀ`` becomes ``(Σ_t ē ēᵀ) ⊙ QQᵀ``, the ``Y`` block is symmetrised,
    and each block below the diagonal is the transpose of its mirror (``factors``:
    ``(U′, Q, QQᵀ)``)."""
    _, Q, QQ = factors
    m, k = Q.shape
    n = m + 2 + k
    S[:m, :m].mul_(QQ)
    yy = S[n:, n:]
    yy.copy_((yy + yy.T) / 2)
    for b, c in ((m, 0), (m + 2, m), (n, m + 2)):  # rows from b, columns c..b
        S[b:, c:b] = S[c:b, b:].T
