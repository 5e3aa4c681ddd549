"""Attention sections: ``resid_pre.L:all → resid_mid.L`` (DESIGN.md §8).

**Attention** in a block without a normalisation, with standard (non-rotary) positions and
one key/value head per query head. For an output direction ``u = [u_d, u_c]`` at query
position ``t``, with ``o_h = W_O^h u_d``, ``w_hs = v_hs·o_h + c_s (b_O·u_d)/H`` and
``β_hs = A_hts (w_hs − Σ_s′ A_hts′ w_hs′)``, the vector-Jacobian product is::

    g_s = Σ_h A_hts W̃_V^h o_h + Σ_h (β_hs/√d_head) W̃_K^h q_ht + e_c Σ_h A_hts (b_O·u_d)/H
    g_t += u + Σ_h W̃_Q^h (Σ_s β_hs k_hs)/√d_head

(``W̃ = [W; b]`` acting on ``x̃ = [x, c]``; ``b_O`` enters through the pattern-weighted
constant, as in :mod:`tl_degen.adapters.base`). Everything sample-independent
(``W̃_V^h W_O^h U``) is formed once, and all output directions are handled in one batched
computation (:class:`AttentionSection`).

**Attention after a LayerNorm or RMSNorm** (:class:`NormAttentionSection`): the same formula
reading the normalised residual, with rotary positions (:class:`Rotary`: Llama/NeoX halves or
GPT-J adjacent pairs, partial or whole heads) and grouped-query heads where the model has
them. Its forward pass and its forward-mode tangents are written out: the edges' input
directions are rank one per token (and so is the norm's Jacobian correction), so their
projections need no matmul per direction (:meth:`NormAttentionSection.edge_squares`); its
Jacobian Gram and pullbacks come from autograd through the formula (one layer's attention in
a few matmuls) instead of through the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.autograd import Pullback
from tl_degen.sections.base import Section
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["AttentionWeights", "Norm", "Rotary", "AttentionFormula", "AttentionSection",
           "NormAttentionSection"]


@dataclass(frozen=True)
class Rotary:
    """Rotary positions as the model applies them to queries and keys of every head: the
    first ``r`` coordinates of a head at position ``p`` become ``x·cos[p] + flip(x)·sin[p]``
    and the rest pass through.

    Attributes:
        cos, sin: ``[n_pos, r]``, the model's own tables (their rounding included).
        adjacent: ``flip`` rotates adjacent pairs ``(x₀, x₁) ↦ (−x₁, x₀)`` (GPT-J); otherwise
            halves ``(x_a, x_b) ↦ (−x_b, x_a)`` (Llama, GPT-NeoX, Hugging Face's
            ``rotate_half``).
    """

    cos: Tensor
    sin: Tensor
    adjacent: bool = False

    def __call__(self, x: Float[Tensor, "... n e"], positions: list[int] | None = None
                 ) -> Float[Tensor, "... n e"]:
        """``x`` rotated, its second-last axis being the positions (all of the table's
        first ``n`` rows, or ``positions``)."""
        r = self.cos.shape[-1]
        cos, sin = (self.cos[:x.shape[-2]], self.sin[:x.shape[-2]]) if positions is None else (
            self.cos[positions], self.sin[positions])
        xr = x[..., :r]
        if self.adjacent:
            pairs = xr.unflatten(-1, (r // 2, 2))
            flip = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        else:
            flip = torch.cat([-xr[..., r // 2:], xr[..., :r // 2]], -1)
        rotated = xr * cos + flip * sin
        return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], -1)


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention, every bias appended as a last input row (``W̃ = [W; b]``).

    Attributes:
        wq: ``[H, d + 1, e]``; wk, wv: ``[H_kv, d + 1, e]`` (``H_kv`` divides ``H``; query
            head ``h`` reads key/value head ``h // (H / H_kv)``, grouped-query attention).
        W_O: ``[H, e, d]``; b_O: ``[d]``.
        scale: the divisor of the attention scores (``√d_head`` unless the model says
            otherwise).
        rotary: the queries' and keys' rotary positions, ``None`` for none.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    W_O: Tensor
    b_O: Tensor
    scale: float
    rotary: Rotary | None = None

    @property
    def H(self) -> int:
        return self.wq.shape[0]

    @property
    def H_kv(self) -> int:
        return self.wk.shape[0]

    @property
    def plain(self) -> bool:
        """One key/value head per query head and no rotary positions (the closed form's
        case, :class:`AttentionSection`)."""
        return self.rotary is None and self.H_kv == self.H


@dataclass(frozen=True)
class Norm:
    """The attention input's normalisation: RMSNorm (``rms``) or LayerNorm, with its weight
    ``w`` and bias ``b`` where it has them (``[d]`` or ``None``) and its ``eps``."""

    rms: bool
    eps: float
    w: Tensor | None
    b: Tensor | None


class AttentionFormula(Section):
    """The attention formula of one layer: keys and values at every position, queries only
    at the positions the output site reads, causal pattern. Subclasses choose what the
    projections read (:meth:`_inputs`)."""

    route_suffix = " (section formula)"

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 weights: AttentionWeights):
        super().__init__(adapter, in_site, out_site, n_pos)
        W = weights
        self.weights = W
        self.H, self.scale = W.H, W.scale
        self.wq, self.wk, self.wv, self.W_O, self.b_O = W.wq, W.wk, W.wv, W.W_O, W.b_O
        self.out_pos = out_site.resolve_positions(n_pos)
        H, D, e = W.wq.shape
        dev = W.wq.device
        self._mask = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=dev), 1)
        # fused weights, formed once: for the forward pass k | v ([D, (h_kv, k|v, e)]), the
        # scaled queries ([D, (h, e)]) and the output projection
        self._w_kv = torch.cat([W.wk, W.wv], -1).permute(1, 0, 2).reshape(D, -1)
        self._w_q = W.wq.permute(1, 0, 2).reshape(D, -1) / W.scale
        self._w_o = W.W_O.reshape(-1, W.W_O.shape[-1])
        idx = torch.arange(n_pos, device=dev)
        self._future = idx[None, :] > torch.tensor(self.out_pos, device=dev)[:, None]  # [t, s]

    def _inputs(self, x: Tensor, xs: Tensor, c: Tensor) -> Tensor:
        """What the projections read: ``x`` itself (``xs, c``: its split into the residual
        and the constant coordinate, the only views of ``x`` the section takes)."""
        return x

    def forward(self, x: Float[Tensor, "batch n_pos d_in"], tokens: Tensor | None = None
                ) -> Float[Tensor, "batch n_out d_in"]:
        """Keys and values at every position, queries only at the positions read; three
        matmuls over the whole batch, heads in the batch dimensions of the pattern products
        (no permuted copies under ``vmap``), the scale folded into ``W_Q``. Grouped-query
        heads share their key/value head through the pattern product's rows (query heads
        ``[h_kv, group, t]``), never a repeated copy of the keys."""
        H, pos, W = self.H, self.out_pos, self.weights
        H_kv = W.H_kv
        b, S, D = x.shape
        # one split, no slices of x: under autograd a slice's gradient is a zero-filled copy
        # of all of x, one per slice, added up; a split's is one concatenation
        xs, c = x.split([D - 1, 1], -1)
        xn = self._inputs(x, xs, c)
        e = self.wq.shape[-1]
        kv = (xn.reshape(b * S, D) @ self._w_kv).view(b, S, H_kv, 2 * e).transpose(1, 2)
        k, v = kv.split(e, -1)  # [b, H_kv, S, e]
        T = len(pos)
        every = T == S  # every position read (in order): no gather of the queries' rows
        q = ((xn if every else xn[:, pos]).reshape(b * T, D) @ self._w_q
             ).view(b, T, H, e).transpose(1, 2)
        if W.rotary is not None:
            q, k = W.rotary(q, pos), W.rotary(k)
        if H_kv != H:  # [b, H_kv, (group, t), e]
            q = q.reshape(b, H_kv, (H // H_kv) * T, e)
        scores = (q @ k.transpose(-1, -2)).view(b, H, T, S)
        A = scores.masked_fill(self._future, float("-inf")).softmax(-1)  # [b, H, t, s]
        z = (A.view(b, H_kv, -1, S) @ v).view(b, H, T, e)
        z = z.transpose(1, 2).reshape(b * T, H * e)
        delta = (z @ self._w_o).view(b, T, -1) + (A.sum(1) @ c) * self.b_O / H
        # [x_t + Δ_t, c_t]: x's gradient passes through unchanged
        return (x if every else x[:, pos]) + torch.nn.functional.pad(delta, (0, 1))


class NormAttentionSection(AttentionFormula):
    """Attention after a LayerNorm or RMSNorm (``ln1``): the projections read
    ``[norm(x), c]``, the residual ``x``. Its Gram and pullbacks come from autograd through
    :meth:`forward`; its forward-route edges from tangents written out
    (:meth:`edge_squares`). ``norm=None``: a block without a normalisation whose attention
    has no closed form (rotary positions or grouped-query heads)."""

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 weights: AttentionWeights, norm: Norm | None):
        super().__init__(adapter, in_site, out_site, n_pos, weights)
        self.norm = norm

    def _inputs(self, x: Tensor, xs: Tensor, c: Tensor) -> Tensor:
        """``[norm(x), c]``: LayerNorm (or RMSNorm) of the residual stream ``xs`` with its
        bias scaled by the constant coordinate ``c``, as the adapter runs it (every bias
        inside a section is multiplied by ``c``)."""
        N = self.norm
        if N is None:
            return x
        d = (xs.shape[-1],)
        y = (torch.nn.functional.rms_norm(xs, d, N.w, N.eps) if N.rms else
             torch.nn.functional.layer_norm(xs, d, N.w, None, N.eps))
        if N.b is not None:
            y = y + c * N.b
        return torch.cat([y, c], dim=-1)


    # ------------------------------------------------------------------ edges, forward mode
    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None) -> Tensor:
        """``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8), ``[k_out, k_in]``: the forward route with the
        tangents written out (the backward route: autograd through :meth:`forward`).

        Input direction ``j``'s tangent ``h[b,s,j]·C⁺[j]`` is rank one per token, and so is
        the norm's Jacobian correction, so its projections need no GEMM per direction::

            d(ñ W)[j,b,s] = h[b,s,j]·((G[j] − a[b,s,j] R[b,s]) / σ[b,s] + C⁺[j,c] g)

        with ``G = C⁺P diag(w) W`` (``P`` the LayerNorm's centring), ``R = ŷ diag(w) W``,
        ``a = ŷ·C⁺[j]/d`` (``ŷ`` the normalised token, ``σ`` its divisor) and
        ``g = b_ln W + w_c``. The pattern's tangent ``dA = A ⊙ (dS − Σ_s A dS)`` and
        ``dz = dA v + A dv`` follow for a block of directions at once, and ``dz`` meets the
        output basis through ``W_O C`` (one product). Rotary positions rotate the tangents of
        ``q`` and ``k`` as they rotate ``q`` and ``k``."""
        if route == "backward":
            return super().edge_squares(x_eval, h, C_pinv, out_basis, alphas, weights, tokens,
                                        route)
        with torch.no_grad():  # tangents written out: nothing to differentiate
            return self._forward_edge_squares(x_eval.detach(), h.detach(), C_pinv,
                                              out_basis, alphas, weights)

    def _forward_edge_squares(self, x: Tensor, h: Tensor, C_pinv: Tensor,
                              out_basis: Tensor | None, alphas: list[float],
                              weights: list[float]) -> Tensor:
        """:meth:`edge_squares`' forward route, without gradients."""
        dt, dev = x.dtype, x.device
        W, N = self.weights, self.norm
        H, H_kv, pos = self.H, W.H_kv, self.out_pos
        e = self.wq.shape[-1]
        grp = H // H_kv
        d = x.shape[-1] - 1
        T, S, b_all = len(pos), x.shape[1], x.shape[0]
        f64 = torch.float64
        C = (torch.eye(self.d_out, dtype=f64, device=dev) if out_basis is None
             else out_basis.to(f64))
        Cp = C_pinv.to(f64)
        k_in, k_out = Cp.shape[0], C.shape[1]
        ln_w = (torch.ones(d, dtype=f64, device=dev) if N is None or N.w is None
                else N.w.double())
        Cpd = Cp[:, :d] - (Cp[:, :d].mean(1, keepdim=True) if N is not None and not N.rms
                           else 0.0)  # C⁺P
        # per pair: G, g for k|v and for the scaled queries; the residual and output terms
        parts = {}
        for name, Wt in (("kv", self._w_kv), ("q", self._w_q)):
            Wx = Wt[:d].double()
            Wn = ln_w[:, None] * Wx if N is not None else Wx
            g = Wt[d].double() + (N.b.double() @ Wx if N is not None and N.b is not None
                                  else 0.0)
            parts[name] = ((Cpd @ Wn).to(dt), g.to(dt), Wn.to(dt))
        cpd = (Cp[:, :d] / d).to(dt)  # [k_in, d]: a = ŷ·C⁺[j]/d
        CU = (Cp @ C).to(dt)  # [k_in, k_out]: the residual
        WOU = (self.W_O.reshape(H * e, -1).double() @ C[:d]).to(dt)  # [(h, e), k_out]
        bU = (self.b_O.double() @ C[:d] / H).to(dt)  # [k_out]
        cpc = Cp[:, d].to(dt)  # [k_in]: C⁺'s constant column
        E = torch.zeros(k_in, k_out, dtype=f64, device=dev)
        F_kv = 2 * H_kv * e
        per_dir = S * F_kv + T * H * e + 4 * H * T * S + T * k_out
        for start in range(0, b_all, 64):
            xb, hb = x[start:start + 64], h[start:start + 64].to(dt)
            b = xb.shape[0]
            m_dirs = max(1, min(64, 2**23 // max(1, b * per_dir)))
            prims = [self._tangent_primal(alpha * xb, N, parts, cpd) for alpha in alphas]
            for j0 in range(0, k_in, m_dirs):
                J = slice(j0, min(k_in, j0 + m_dirs))
                hJ = hb[..., J].permute(2, 0, 1)  # [m, b, S]
                m = hJ.shape[0]
                y = None
                for wgt, P in zip(weights, prims):
                    dkv = self._tangent_projection(P, "kv", hJ, J, parts, cpc, None)
                    dq = self._tangent_projection(P, "q", hJ[:, :, pos], J, parts, cpc, pos)
                    dkv = dkv.view(m, b, S, H_kv, 2 * e).transpose(2, 3)  # [m, b, h_kv, S, 2e]
                    dk, dv = dkv[..., :e], dkv[..., e:]
                    dq = dq.view(m, b, T, H, e).transpose(2, 3)  # [m, b, H, T, e]
                    if W.rotary is not None:
                        dq, dk = W.rotary(dq, pos), W.rotary(dk)
                    q, k, v, A = P["q"], P["k"], P["v"], P["A"]  # grouped [b, h_kv, (g, T), ·]
                    dq = dq.reshape(m, b, H_kv, grp * T, e)
                    dS = dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)  # [m,b,hkv,gT,S]
                    dA = A * (dS - (A * dS).sum(-1, keepdim=True))
                    dz = dA @ v + A @ dv  # [m, b, h_kv, (g, T), e]
                    dz = dz.view(m, b, H, T, e).transpose(2, 3).reshape(m, b, T, H * e)
                    out = dz @ WOU  # [m, b, T, k_out]
                    out.addcmul_(hJ[:, :, pos, None], CU[J][:, None, None, :])
                    # the pattern-weighted constant b_O: Σ_s (Σ_h dA) c + Σ_s (Σ_h A) dc
                    dsum = dA.view(m, b, H, T, S).sum(2)  # [m, b, T, S]
                    beta = (dsum @ P["c"][:, :, None])[..., 0]
                    beta += (P["Asum"] @ (hJ * cpc[J][:, None, None])[..., None])[..., 0]
                    out.addcmul_(beta[..., None], bU)
                    y = out if len(weights) == 1 else (
                        wgt * out if y is None else y.add_(out, alpha=wgt))
                E[J] += y.square().sum((1, 2), dtype=f64)
        return E.T

    def _tangent_primal(self, x: Tensor, N: Norm | None, parts: dict, cpd: Tensor) -> dict:
        """The primal quantities of :meth:`edge_squares` at ``x`` (``[b, S, D]``): ``σ``,
        ``a = ŷ C⁺ᵀ/d``, ``R`` per projection, ``q, k, v`` (rotated, grouped) and the
        pattern."""
        W = self.weights
        H, H_kv, pos = self.H, W.H_kv, self.out_pos
        e = self.wq.shape[-1]
        b, S, D = x.shape
        T = len(pos)
        xs, c = x[..., :-1], x[..., -1]
        out = {"c": c}
        if N is not None:
            xc = xs if N.rms else xs - xs.mean(-1, keepdim=True)
            sigma = (xc.square().mean(-1, keepdim=True) + N.eps).sqrt()  # [b, S, 1]
            yhat = xc / sigma
            out["sigma"], out["a"] = sigma, yhat @ cpd.T
            out["R_kv"] = yhat @ parts["kv"][2]
            out["R_q"] = yhat[:, pos] @ parts["q"][2]
        xn = self._inputs(x, *x.split([D - 1, 1], -1))
        kv = (xn.reshape(b * S, D) @ self._w_kv).view(b, S, H_kv, 2 * e).transpose(1, 2)
        k, v = kv[..., :e], kv[..., e:]
        q = (xn[:, pos].reshape(b * T, D) @ self._w_q).view(b, T, H, e).transpose(1, 2)
        if W.rotary is not None:
            q, k = W.rotary(q, pos), W.rotary(k)
        q = q.reshape(b, H_kv, (H // H_kv) * T, e)
        scores = (q @ k.transpose(-1, -2)).view(b, H, T, S)
        A = scores.masked_fill(self._future, float("-inf")).softmax(-1)
        out.update(q=q, k=k.contiguous(), v=v.contiguous(), A=A.view(b, H_kv, -1, S),
                   Asum=A.sum(1))
        return out

    @staticmethod
    def _tangent_projection(P: dict, name: str, hJ: Tensor, J: slice, parts: dict,
                            cpc: Tensor, pos: list[int] | None) -> Tensor:
        """``d(ñ W)`` of the directions ``J`` (the formula of :meth:`edge_squares`):
        ``[m, b, S′, F]`` for the positions of ``hJ`` (``[m, b, S′]``: every position, or
        ``pos``)."""
        G, g, _ = parts[name]
        hc = (hJ * cpc[J][:, None, None])[..., None]  # the constant coordinate's tangent
        if "sigma" not in P:  # no normalisation: h·(C⁺W)[j]
            out = hJ[..., None] * G[J][:, None, None, :]
            return out.addcmul_(hc, g)
        sigma = P["sigma"] if pos is None else P["sigma"][:, pos]  # [b, S′, 1]
        a = P["a"] if pos is None else P["a"][:, pos]  # [b, S′, k_in]
        R = P["R_kv"] if name == "kv" else P["R_q"]  # [b, S′, F]
        tG = hJ / sigma[None, ..., 0]  # [m, b, S′]
        out = tG[..., None] * G[J][:, None, None, :]
        out.addcmul_((tG * a[..., J].permute(2, 0, 1))[..., None], R[None], value=-1)
        return out.addcmul_(hc, g)


class AttentionSection(AttentionFormula):
    """Attention without a normalisation, standard positions and one key/value head per
    query head (``weights.plain``): closed-form Jacobian Gram, edges and pullbacks (the
    module docstring)."""

    closed_form = True

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 weights: AttentionWeights):
        if not weights.plain:
            raise ValueError("the closed form needs standard positions and one key/value "
                             "head per query head; use NormAttentionSection(norm=None)")
        super().__init__(adapter, in_site, out_site, n_pos, weights)
        # q | k | v of every head from one matmul ([D, (3, H, e)])
        W = weights
        H, D, e = W.wq.shape
        self._w_qkv = torch.stack([W.wq, W.wk, W.wv]).permute(2, 0, 1, 3).reshape(D, 3 * H * e)

    def _qkv_pattern(self, xt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[b, H, P, e]`` (views) and the pattern ``[b, H, P, P]`` at every
        position of ``xt`` (``[b, P, d + 1]``)."""
        b, n = xt.shape[:2]
        H, e = self.H, self.wq.shape[-1]
        qkv = (xt.reshape(b * n, -1) @ self._w_qkv).view(b, n, 3, H, e).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q @ k.transpose(-1, -2)) / self.scale
        return q, k, v, scores.masked_fill(self._mask, float("-inf")).softmax(-1)

    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        if len(alphas) == 1:  # summed in factored form
            acc.add_matrix(weights[0] ** 2 * self._jacobian_gram(alphas[0] * x, out_basis))
        else:
            for pb in self.pullbacks(x, out_basis, alphas, weights):
                acc.add_rows(pb.g.transpose(-1, -2))
        acc.add_count(x.shape[0] * x.shape[1])

    def _jacobian_gram(self, x: Tensor, out_basis: Tensor | None) -> Tensor:
        """``Σ_b Σ_t Σ_s g_s(u) g_s(u)ᵀ`` summed over the output directions ``u`` (columns of
        ``C``), without forming the pullbacks ``g`` (``[b, s, d+1, k]``).

        With the notation of the module docstring, ``g_s = P1_s + P2_s + P3_s + δ_st P4``:
        ``P1_s = Σ_h A_hts V_h`` (``V_h = W̃_V^h W_O^h U``, sample-independent),
        ``P2_s = Σ_h κ_h β_hsᵀ`` (``κ_h = W̃_K^h q_ht/√d_head``), ``P3_s = e_c a_s bUᵀ``
        (``a_s = Σ_h A_hts``) and ``P4 = C + W̃_Q KB`` (``KB_h = Σ_s k_hs β_hsᵀ``, ``W̃_Q``
        scaled by ``1/√d_head``).
        Every product of two terms is summed over samples before it meets the
        ``[d+1, k]`` matrices, so the cost is that of the attention itself plus
        ``O(H² (d+1)² k)``, not ``O(N·P·(d+1)²·k)``. Equal to the sum of the pullbacks'
        outer products (tests/sections/test_recognise.py) to float64 rounding.
        """
        dt, dev = x.dtype, x.device
        H, scale = self.H, self.scale
        D = x.shape[-1]
        d_out = self.d_out
        C = torch.eye(d_out, dtype=dt, device=dev) if out_basis is None else out_basis.to(dt)
        kk = C.shape[1]
        U_d = C[:-1]
        O = torch.einsum("hed,dk->hek", self.W_O, U_d)  # [H, e, k]
        bU = self.b_O @ U_d / H  # [k]
        V = torch.einsum("hde,hek->hdk", self.wv, O)  # [H, D, k]
        wq_s, wk_s = self.wq / scale, self.wk / scale  # [H, D, e]
        e = wq_s.shape[2]
        f64 = dict(dtype=torch.float64, device=dev)
        He = H * e
        S_hg = torch.zeros(H, H, **f64)
        T22 = torch.zeros(D, D, **f64)
        T12 = torch.zeros(D, D, **f64)
        Vhk = V.permute(0, 2, 1).reshape(H * kk, D)  # [(h, k), D]
        c13 = torch.zeros(H, **f64)
        v23 = torch.zeros(D, **f64)
        s33 = torch.zeros((), **f64)
        n = 0
        sum_kb = torch.zeros(He, kk, **f64)
        KK = torch.zeros(He, He, **f64)
        a_t_tot = torch.zeros(H, **f64)
        p2_sum = torch.zeros(D, kk, **f64)
        a_t_sum = torch.zeros((), **f64)
        Z = torch.zeros(H, H, e, kk, **f64)  # [h, g, e, k]
        W2 = torch.zeros(He, D, **f64)
        w3 = torch.zeros(He, **f64)
        S = x.shape[1]
        # at most 256 samples a chunk: larger chunks fall out of the caches
        chunk = max(1, min(256, 2**23 // max(1, H * S * max(kk, H * S, He))))
        gam_buf = torch.empty(chunk * H * H * kk, dtype=dt, device=dev)
        lhs_buf = torch.empty(H * He * chunk * S, dtype=dt, device=dev)
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            b = xb.shape[0]
            ca = xb[..., -1]
            q, k, v, A = self._qkv_pattern(xb)  # [b, H, s, e], pattern [b, H, t, s]
            kH = k.transpose(0, 1).contiguous()  # [H, b, s, e]
            vo = (v.transpose(0, 1).reshape(H, b * S, e) @ O).view(H, b, S, kk)
            # block-diagonal keys, rows (b, h, s), columns (h, e)
            Kblk = torch.zeros(b, H, S, H, e, dtype=dt, device=dev)
            for h in range(H):
                Kblk[:, h, :, h] = k[:, h]
            Kblk = Kblk.view(b * H * S, He)
            for t in self.out_pos:
                At = A[:, :, t].transpose(0, 1).contiguous()  # [H, b, s]
                w = vo + ca[None, :, :, None] * bU
                Aw = At[..., None] * w  # β = A (w - Σ_s A w), without a batched product of S
                beta = Aw - At[..., None] * Aw.sum(2, keepdim=True)  # [H, b, s, k]
                kappa = q[:, :, t].transpose(0, 1) @ wk_s.transpose(1, 2)  # [H, b, D]
                kapB = kappa.transpose(0, 1).contiguous()  # [b, H, D]
                kap2 = kapB.view(b * H, D)
                a = At.sum(0)  # [b, s]
                betaB = beta.permute(1, 0, 2, 3).reshape(b, H * S, kk)  # [b, (h, s), k]
                # Σ_s (P1 + P2 + P3)(P1 + P2 + P3)ᵀ
                At2 = At.view(H, b * S)
                S_hg += (At2 @ At2.T).double()
                betaS = betaB.view(b, H, S * kk)
                Bm = torch.bmm(betaS, betaS.transpose(1, 2))  # [b, H, H]
                T22 += (kap2.T @ torch.bmm(Bm, kapB).view(b * H, D)).double()
                # γ[b, g, h, k] = Σ_s A_bhs β_bgsk as S multiply-adds into a buffer (a
                # batched product with an inner size of S runs far below the matmul rate), then
                # U[(b, g), :] = Σ_{h,k} γ V[h, :, k] and T12 = Σ_{b,g} U κᵀ
                bS, AB = beta.permute(1, 2, 0, 3), At.transpose(0, 1)  # [b, s, g, k], [b, h, s]
                gam = torch.mul(bS[:, 0, :, None], AB[:, None, :, 0, None],
                                out=gam_buf[:b * H * H * kk].view(b, H, H, kk))
                for s in range(1, S):
                    gam.addcmul_(bS[:, s, :, None], AB[:, None, :, s, None])
                T12 += ((gam.view(b * H, H * kk) @ Vhk).T @ kap2).double()
                c13 += (At * a[None]).sum((1, 2)).double()
                r = beta @ bU  # [H, b, s]
                v23 += (kappa.reshape(H * b, D).T @ (r * a[None]).sum(2).reshape(H * b)).double()
                s33 += (a * a).sum().double()
                # the s = t row: P4 = C + W̃_Q KB, KB_h = Σ_s k_hs β_hsᵀ (never formed)
                n += b
                sum_kb += (Kblk.T @ betaB.view(b * H * S, kk)).double()
                MB = torch.bmm(betaB, betaB.transpose(1, 2))  # [b, (h, s), (g, t')]
                KK += (Kblk.T @ torch.bmm(MB, Kblk.view(b, H * S, He)).view(-1, He)).double()
                At_t = At[:, :, t]  # [H, b]
                a_t_tot += At_t.sum(1).double()
                beta_t = beta[:, :, t]  # [H, b, k]
                p2_sum += (kappa.reshape(H * b, D).T @ beta_t.reshape(H * b, kk)).double()
                a_t_sum += a[:, t].sum().double()
                lhs = torch.mul(At_t[None, :, None, :, None], kH.permute(0, 3, 1, 2)[:, None],
                                out=lhs_buf[:H * He * b * S].view(H, H, e, b, S))
                Z += (lhs.reshape(H, He, b * S) @ beta.reshape(H, b * S, kk)).view(
                    H, H, e, kk).double()
                Bt = torch.bmm(betaB, beta_t.permute(1, 2, 0))  # [b, (h, s), g]
                W2 += (Kblk.T @ torch.bmm(Bt, kapB).view(-1, D)).double()
                rv = (r * a[:, t][None, :, None]).permute(1, 0, 2).reshape(-1)
                w3 += (Kblk.T @ rv).double()
        V, C, bU = V.double(), C.double(), bU.double()
        WQ = wq_s.double().permute(1, 0, 2).reshape(D, He)  # [D, (h, e)]
        ec = torch.zeros(D, **f64)
        ec[-1] = 1.0
        VV = torch.einsum("hdk,gfk->hgdf", V, V)
        M = torch.einsum("hg,hgdf->df", S_hg, VV) + T22
        T13 = torch.outer(torch.einsum("h,hdk,k->d", c13, V, bU), ec)
        T23 = torch.outer(v23, ec)
        M += T12 + T12.T + T13 + T13.T + T23 + T23.T + s33 * (bU @ bU) * torch.outer(ec, ec)
        CKB = C @ sum_kb.T @ WQ.T
        M += n * (C @ C.T) + CKB + CKB.T + WQ @ KK @ WQ.T
        Q_sum = torch.einsum("h,hdk->dk", a_t_tot, V) + p2_sum + torch.outer(ec, a_t_sum * bU)
        X = torch.einsum("hgek,gdk->hed", Z, V).reshape(He, D) + W2 + torch.outer(w3, ec)
        cross = C @ Q_sum.T + WQ @ X
        return M + cross + cross.T

    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None, chunk: int = 256) -> Tensor:
        """``Σ_b Σ_t A[b,t,i,j]²`` (§4 step 8), ``[k_out, k_in]``: the pullback's terms
        contracted with ``h`` one by one, without forming the pullback."""
        x = x_eval
        dt = x.dtype
        H, scale = self.H, self.scale
        d_out = self.d_out
        C = (torch.eye(d_out, dtype=dt, device=x.device) if out_basis is None
             else out_basis.to(dt))
        Cp = C_pinv.to(dt)  # [j, d+1]
        U_d = C[:-1]
        O = torch.einsum("hed,dk->hek", self.W_O, U_d)
        bU = self.b_O @ U_d / H
        PVj = torch.einsum("jd,hde,hek->hjk", Cp, self.wv, O)  # [H, k_in, k]
        wk_j = torch.einsum("jd,hde->hje", Cp, self.wk) / scale
        wq_j = torch.einsum("jd,hde->hje", Cp, self.wq) / scale
        cp_const = Cp[:, -1]  # [k_in]
        CpC = Cp @ C  # [k_in, k]
        kk, kj = C.shape[1], Cp.shape[0]
        wk_jT, wq_jT = wk_j.transpose(1, 2), wq_j.transpose(1, 2)  # [H, e, k_in]
        Q = torch.cat([PVj, (cp_const[:, None] * bU)[None], CpC[None]]).transpose(
            0, 1).contiguous()  # [k_in, H + 2, k]
        E = torch.zeros(kj, kk, dtype=torch.float64, device=x.device)  # transposed at the end
        # [b, k_in, k] per chunk of about 2²⁰ floats, written into three buffers allocated
        # once (fresh tensors per chunk cost their page faults)
        chunk = max(1, min(chunk, 2**20 // max(1, kk * kj), x.shape[0]))
        buf_paths, buf_coef, buf_sq = (torch.empty(chunk * kj * kk, dtype=dt, device=x.device)
                                       for _ in range(3))
        buf_p = torch.empty(chunk * H * x.shape[1] * kj, dtype=dt, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xb, hb = x[start:start + chunk], h[start:start + chunk].to(dt)
            b, S = hb.shape[:2]
            fwd = []
            for alpha, wgt in zip(alphas, weights):
                q, k, v, A = self._qkv_pattern(alpha * xb)  # [b, H, s, e], [b, H, t, s]
                vo = torch.einsum("bhse,hek->bhsk", v, O)
                kwq = (k.transpose(0, 1).reshape(H, b * S, -1) @ wq_jT).view(H, b, S, kj)
                fwd.append((wgt, alpha * xb[..., -1], q, A, vo, kwq.transpose(0, 1)))
            for t in self.out_pos:
                A_total = None
                for wgt, ca, q, A, vo, kwq in fwd:
                    At = A[:, :, t]  # [b, H, s]
                    w = vo + ca[:, None, :, None] * bU
                    Aw = At[..., None] * w  # β = A (w - Σ_s A w), as in the Gram
                    beta = Aw - At[..., None] * Aw.sum(2, keepdim=True)
                    ah = torch.bmm(At, hb)  # [b, H, k_in]: Σ_s A_hts h_sj
                    wkq = (q[:, :, t].transpose(0, 1) @ wk_jT).transpose(0, 1)  # [b, H, k_in]
                    # key path h[s]·(W̃_K q_t) and query path h[t]·(W̃_Q k_s), both weighted
                    # by β[b,h,s,k]: one [k_in, (h, s)] × [(h, s), k] product per sample
                    paths = torch.mul(wkq[:, :, None], hb[:, None],  # [b, H, s, k_in]
                                      out=buf_p[:b * H * S * kj].view(b, H, S, kj))
                    paths.addcmul_(kwq, hb[:, None, t:t + 1])  # in place: no copy for the bmm
                    Ab = torch.bmm(paths.reshape(b, H * S, kj).transpose(1, 2),
                                   beta.reshape(b, H * S, kk),
                                   out=buf_paths[:b * kj * kk].view(b, kj, kk))
                    # the value path Σ_h (Σ_s A h)[j] PVj[h,j,:], the bias term and the
                    # residual h[t,j] (C⁺C)[j,:]: coefficients [j, b, H + 2] times matrices
                    # [j, H + 2, k], one product batched over j (one pass over [b, j, k]
                    # instead of one per term)
                    coef = torch.cat([ah, ah.sum(1, keepdim=True), hb[:, t, None]], 1)
                    Ab += torch.bmm(coef.permute(2, 0, 1).contiguous(), Q,
                                    out=buf_coef[:b * kj * kk].view(kj, b, kk)).transpose(0, 1)
                    A_total = Ab if len(fwd) == 1 else (
                        wgt * Ab if A_total is None else A_total + wgt * Ab)
                A_total = A_total.double()
                sq = buf_sq[:A_total.numel()].view(A_total.shape) if dt == torch.float64 else None
                E += torch.mul(A_total, A_total, out=sq).sum(0)
        return E.T


    def pullbacks(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                  weights: list[float], tokens: Tensor | None = None,
                  chunk: int = 256) -> Iterator[Pullback]:
        dt = x.dtype
        C = (torch.eye(self.d_out, dtype=dt, device=x.device) if out_basis is None
             else out_basis.to(dt))
        dirs = torch.arange(C.shape[1], device=x.device)
        H, scale = self.H, self.scale
        wq, wk, wv, W_O, b_O = self.wq, self.wk, self.wv, self.W_O, self.b_O
        U_d = C[:-1]  # the output constant (last row of C) only enters through g_t
        O = torch.einsum("hed,dk->hek", W_O, U_d)  # [H, e, k]
        bU = b_O @ U_d / H  # [k]
        PV = torch.einsum("hde,hek->hdk", wv, O)  # [H, d+1, k], sample independent
        wq_s, wk_s = wq / scale, wk / scale
        all_rows = list(range(self.n_pos))
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            fwd = [(wgt, alpha * xb[..., -1], *self._qkv_pattern(alpha * xb))
                   for alpha, wgt in zip(alphas, weights)]
            for j, t in enumerate(self.out_pos):
                g_total = None
                for wgt, ca, q, k, v, A in fwd:
                    At = A[:, :, t]  # [b, H, s]
                    w = torch.einsum("bhse,hek->bhsk", v, O) + ca[:, None, :, None] * bU
                    beta = At[..., None] * (w - (At[..., None] * w).sum(2, keepdim=True))
                    g = torch.einsum("bhs,hdk->bsdk", At, PV)
                    g += torch.einsum("bhsk,bhd->bsdk", beta,
                                      torch.einsum("hde,bhe->bhd", wk_s, q[:, :, t]))
                    g[:, :, -1] += torch.einsum("bhs,k->bsk", At, bU)
                    kq = torch.einsum("bhsk,bhse->bhek", beta, k)
                    g[:, t] += C + torch.einsum("hde,bhek->bdk", wq_s, kq)
                    g_total = g if len(fwd) == 1 else (
                        wgt * g if g_total is None else g_total + wgt * g)
                yield Pullback(slice(start, start + xb.shape[0]), all_rows, j, dirs, g_total)

