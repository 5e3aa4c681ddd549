"""Closed-form Jacobian Grams for sections without autograd (DESIGN.md §8).

These section shapes have Jacobians that need no backward passes:

* **MLP** ``resid_mid.L → resid_post.L`` in a block without a LayerNorm before the MLP:
  ``f(x) = x + σ(x W_in + c b_in) W_out + c b_out``. With ``x̃ = [x, c]``,
  ``W̃_in = [W_in; b_in]``, ``W̃_out = [W_out, 0]`` and ``J0 = I + e_c [b_out, 0]``, the
  Jacobian of one row is ``J = J0 + W̃_in D W̃_out`` with ``D = diag σ′(pre)``, so with
  ``K = C Cᵀ`` of the output basis and ``A = W̃_out K W̃_outᵀ``::

      Σ_r J_r K J_rᵀ = n J0 K J0ᵀ + (J0 K W̃_outᵀ diag(Σσ′) W̃_inᵀ + transpose)
                       + W̃_in (A ⊙ S) W̃_inᵀ,      S = Σ_r σ′_r σ′_rᵀ.

  Integrated gradients average ``D`` over ``α`` (``pre(αx̃) = α pre(x̃)``), so ``σ′`` is
  replaced by ``Σ_α w_α σ′(α pre)``.
* **Into the MLP hidden site** ``resid_mid.L → mlp_post.L``: the same form with the output
  ``[σ(x̃ W̃_in), x, c]``, i.e. ``W̃_out = [I_m, 0]`` (select the hidden block) and
  ``J0 = [0, I_(d+1)]`` (the bypass stream and the constant pass through).
* **Out of the MLP hidden site** ``mlp_post.L → resid_post.L``: linear,
  ``J = [[W_out, 0], [I, 0], [b_out, 1]]`` for every row.
* **Unembedding** ``resid_post.(n_layers-1) → logits`` without a final LayerNorm:
  ``J = [W_U; b_U]`` for every row.
* **Attention** ``resid_pre.L:all → resid_mid.L`` in a block without LayerNorm, with
  standard (non-rotary) positions and one key/value head per query head. For an output
  direction ``u = [u_d, u_c]`` at query position ``t``, with ``o_h = W_O^h u_d``,
  ``w_hs = v_hs·o_h + c_s (b_O·u_d)/H`` and ``β_hs = A_hts (w_hs − Σ_s′ A_hts′ w_hs′)``,
  the vector-Jacobian product is::

      g_s = Σ_h A_hts W̃_V^h o_h + Σ_h (β_hs/√d_head) W̃_K^h q_ht + e_c Σ_h A_hts (b_O·u_d)/H
      g_t += u + Σ_h W̃_Q^h (Σ_s β_hs k_hs)/√d_head

  (``W̃ = [W; b]`` acting on ``x̃ = [x, c]``; ``b_O`` enters through the pattern-weighted
  constant, as in :mod:`tl_degen.adapters.base`). Everything sample-independent
  (``W̃_V^h W_O^h U``) is formed once, and all output directions are handled in one batched
  computation.

Both act per position, so only positions in both sites contribute. Before use, each form is
checked against the model's own forward pass and one vector-Jacobian product (:func:`recognise`,
on the first batch of each prompt length when :class:`tl_degen.sections.plan.SectionPlan`
asks); otherwise the plan falls back to autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.autograd import Pullback, autograd_pullbacks, forward_edge_squares
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["recognise", "may_have_closed_form", "ClosedFormSection", "Pullback"]

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def _no_norm(adapter: Adapter) -> bool:
    return getattr(adapter.model.cfg, "normalization_type", "LN") is None


def _mean_derivative(act, pre: Tensor, alphas: list[float], weights: list[float]) -> Tensor:
    """``Σ_a w_a σ′(α_a · pre)``: the activation's derivative under the integration rule
    (for the gradient rule, ``σ′(pre)`` itself, no copies)."""
    if list(alphas) == [1.0] and list(weights) == [1.0]:
        return _act_derivative(act, pre)
    return sum(w * _act_derivative(act, a * pre) for a, w in zip(alphas, weights))


def _act_derivative(act, pre: Tensor) -> Tensor:
    if act is F.relu:  # the same values autograd gives (0 at 0), without a backward pass
        return (pre > 0).to(pre.dtype)
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(p).sum(), p)
    return g


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e-7 if a.dtype == torch.float64 else 1e-3
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12))


@dataclass
class ClosedFormSection:
    """A section recognised as MLP, unembedding or attention, with its weights.

    ``kind`` is ``"mlp"``, ``"linear"``, ``"unembed"``, ``"attention"`` (closed-form Grams,
    edges and pullbacks) or ``"norm_attention"`` (attention after a LayerNorm or RMSNorm: its
    formula only, :meth:`forward`, which autograd and forward mode differentiate instead of
    the model, see :attr:`formula_only`)."""

    kind: str
    adapter: Adapter
    in_site: Site
    out_site: Site
    n_pos: int
    params: dict

    @property
    def formula_only(self) -> bool:
        """Whether only the section's formula is known (its Gram and edges then come from
        autograd through :meth:`forward`, by the cheapest route)."""
        return self.kind == "norm_attention"

    # ------------------------------------------------------------------ M′ (fast path)
    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float]) -> None:
        """Add the batch's ``Σ J K Jᵀ`` to ``acc`` (and ``N·P_in`` to its count)."""
        if self.kind == "mlp":
            acc.add_rows(self._mlp_factor(x, out_basis, alphas, weights))
        elif self.kind in ("unembed", "linear"):
            # every row has the same J: Σ_r J K Jᵀ = n (J C)(J C)ᵀ, added as the factor
            # √n (J C)ᵀ (exact, and as precise as the rows: see tl_degen.stats)
            n = self._rows(x).shape[0]
            J64 = self.params["J"].double()
            JC = J64 if out_basis is None else J64 @ out_basis.double()
            acc.add_rows(n**0.5 * JC.T)
        elif self.kind == "attention" and len(alphas) == 1:  # summed in factored form
            acc.add_matrix(weights[0] ** 2 * self._attention_jacobian_gram(alphas[0] * x,
                                                                           out_basis))
        else:
            for pb in self.pullbacks(x, out_basis, alphas, weights):
                acc.add_rows(pb.g.transpose(-1, -2))
        acc.add_count(x.shape[0] * x.shape[1])

    def _mlp_factor(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                    weights: list[float]) -> Float[Tensor, "m_plus_k d_in"]:
        """A square-root factor of the batch's ``Σ_r J_r K J_rᵀ`` with ``m + k`` rows.

        ``J_r C = J0 C + W̃_in diag(σ̄′_r) A`` with ``A = W̃_out C``, so
        ``Σ_r J_r K J_rᵀ = T G Tᵀ`` with ``T = [W̃_in, J0 C]`` (``[d_in, m + k]``) and
        ``G = [[S ⊙ A Aᵀ, diag(Σσ̄′) A], [Aᵀ diag(Σσ̄′), n I_k]]``, ``S = Σ_r σ̄′_r σ̄′_rᵀ``
        (for ReLU, integer counts). ``G`` is small and well formed; its Cholesky factor (or,
        when ``G`` is singular, its eigendecomposition) gives ``L`` with ``LᵀL = G`` and the
        factor is ``L Tᵀ``, so the cancellations inside ``T G Tᵀ`` are never formed (see
        :mod:`tl_degen.stats`). Units that never fire are left out of ``G`` and ``T``.
        """
        xr = self._rows(x)
        P = self.params
        pre = xr @ P["w_in"]
        dbar = _mean_derivative(P["act"], pre, alphas, weights)
        dbar64 = dbar.double()
        d_out = P["j0"].shape[1]
        C = (torch.eye(d_out, dtype=torch.float64, device=x.device) if out_basis is None
             else out_basis.double())
        A = P["w_out_t"].double() @ C  # [m, k]
        J0C = P["j0"].double() @ C  # [d_in, k]
        m, k = A.shape
        dA = dbar64.sum(0)[:, None] * A
        G = torch.empty(m + k, m + k, dtype=torch.float64, device=x.device)
        binary = P["act"] is F.relu and list(alphas) == [1.0] and list(weights) == [1.0]
        G[:m, :m] = (_count_gram(dbar) if binary else _chunked_gram(dbar64)) * (A @ A.T)
        G[:m, m:] = dA
        G[m:, :m] = dA.T
        G[m:, m:] = xr.shape[0] * torch.eye(k, dtype=torch.float64, device=x.device)
        T = torch.cat([P["w_in"].double(), J0C], 1)  # [d_in, m + k]
        live = torch.cat([dbar64.abs().sum(0) > 0,  # units that never fire give zero rows
                          torch.ones(k, dtype=torch.bool, device=x.device)])
        if not bool(live.all()):
            G, T = G[live][:, live], T[:, live]
        # Cholesky where G is positive definite (2 ms against eigh's 22 at m + k = 627),
        # else the eigendecomposition (a singular G: units that fire together)
        L, info = torch.linalg.cholesky_ex(G, upper=True)
        if int(info) != 0:
            evals, vecs = torch.linalg.eigh(G)
            L = vecs.T * evals.clamp_min(0.0).sqrt()[:, None]
        return L @ T.T

    def _attention_jacobian_gram(self, x: Tensor, out_basis: Tensor | None) -> Tensor:
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
        outer products (tests/test_closed_form.py) to float64 rounding.
        """
        P = self.params
        dt, dev = x.dtype, x.device
        H, scale = P["H"], P["scale"]
        D = x.shape[-1]
        d_out = self.adapter.site_dim(self.out_site) + 1
        C = torch.eye(d_out, dtype=dt, device=dev) if out_basis is None else out_basis.to(dt)
        kk = C.shape[1]
        U_d = C[:-1]
        O = torch.einsum("hed,dk->hek", P["W_O"], U_d)  # [H, e, k]
        bU = P["b_O"] @ U_d / H  # [k]
        V = torch.einsum("hde,hek->hdk", P["wv"], O)  # [H, D, k]
        wq_s, wk_s = P["wq"] / scale, P["wk"] / scale  # [H, D, e]
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
        # 256 samples a chunk (modadd): 179 ms against 194 ms for 1024
        chunk = max(1, min(256, 2**23 // max(1, H * S * max(kk, H * S, He))))
        gam_buf = torch.empty(chunk * H * H * kk, dtype=dt, device=dev)
        lhs_buf = torch.empty(H * He * chunk * S, dtype=dt, device=dev)
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            b = xb.shape[0]
            ca = xb[..., -1]
            q, k, v, A = P["attention"](xb)  # [b, H, s, e], pattern [b, H, t, s]
            kH = k.transpose(0, 1).contiguous()  # [H, b, s, e]
            vo = (v.transpose(0, 1).reshape(H, b * S, e) @ O).view(H, b, S, kk)
            # block-diagonal keys, rows (b, h, s), columns (h, e)
            Kblk = torch.zeros(b, H, S, H, e, dtype=dt, device=dev)
            for h in range(H):
                Kblk[:, h, :, h] = k[:, h]
            Kblk = Kblk.view(b * H * S, He)
            for t in P["out_pos"]:
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
                # batched product with an inner size of S ran at 5 GFLOP/s), then
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

    def _rows(self, x: Tensor) -> Tensor:
        return x[:, self.params["rows_in"]].reshape(-1, x.shape[-1])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Float[Tensor, "batch n_in d_in"]
                ) -> Float[Tensor, "batch n_out d_out"] | None:
        """The section's output, as :meth:`Adapter.run` returns it with ``x`` written at the
        input site and the output site read: ``[batch, n_out_positions, d_out (+1)]``, the
        constant coordinate last (none for logits). Only the section is computed — nothing
        upstream of the input site and nothing at positions the output does not read.

        Returns ``None`` when some output position is not a function of the written
        positions alone (then the caller runs the model).
        """
        P = self.params
        if self.kind in ("attention", "norm_attention"):
            return self._attention_forward(x)
        if len(P["out_rows"]) != len(self.out_site.resolve_positions(self.n_pos)):
            return None
        xr = x[:, P["rows_in"]]  # [b, n_out, d_in + 1], in the order of the out positions
        if self.kind in ("unembed", "linear"):
            return xr @ P["J"]  # the last column of a linear J carries the constant
        pre = xr @ P["w_in"]
        # ReLU in place on the fresh product (a new [b, n, m] tensor cost its page faults)
        hidden = pre.clamp_min_(0.0) if P["act"] is F.relu else P["act"](pre)
        if self.out_site.kind == "mlp_post":
            return torch.cat([hidden, xr], dim=-1)
        out = xr[..., :-1] + hidden @ P["w_out_t"][:, :-1] + xr[..., -1:] * P["j0"][-1, :-1]
        return torch.cat([out, xr[..., -1:]], dim=-1)

    def _normalised(self, x: Tensor) -> Tensor:
        """``[norm(x), c]``: the attention's input, LayerNorm (or RMSNorm) of the residual
        stream with its bias scaled by the constant coordinate ``c``, as the adapter runs it
        (every bias inside a section is multiplied by ``c``)."""
        N = self.params["norm"]
        xs, c = x[..., :-1], x[..., -1:]
        d = (xs.shape[-1],)
        y = (torch.nn.functional.rms_norm(xs, d, N["w"], N["eps"]) if N["rms"] else
             torch.nn.functional.layer_norm(xs, d, N["w"], None, N["eps"]))
        if N["b"] is not None:
            y = y + c * N["b"]
        return torch.cat([y, c], dim=-1)

    def _attention_forward(self, x: Tensor) -> Tensor:
        """Keys and values at every position, queries only at the positions read; three
        matmuls over the whole batch, heads in the batch dimensions of the pattern products
        (no permuted copies under ``vmap``), the scale folded into ``W_Q``. With a
        normalisation before the attention (``norm_attention``) the projections read
        :meth:`_normalised` (a fused ``layer_norm``) and the residual ``x``. Forward mode
        through it ran 1.2× faster than through the model at 16 × 128 tokens (GPT-2 small
        shape, float32)."""
        P = self.params
        H, pos = P["H"], P["out_pos"]
        xn = self._normalised(x) if self.kind == "norm_attention" else x
        b, S, D = x.shape
        if "w_kv" not in P:  # fused [D, (h, k|v, e)] and [D, (h, e)] weights, formed once
            P["w_kv"] = torch.cat([P["wk"], P["wv"]], -1).permute(1, 0, 2).reshape(D, -1)
            P["w_q"] = P["wq"].permute(1, 0, 2).reshape(D, -1) / P["scale"]  # scaled once
            P["w_o"] = P["W_O"].reshape(-1, P["W_O"].shape[-1])
            idx = torch.arange(S, device=x.device)
            P["future"] = idx[None, :] > torch.tensor(pos, device=x.device)[:, None]  # [t, s]
        e = P["wq"].shape[-1]
        kv = (xn.reshape(b * S, D) @ P["w_kv"]).view(b, S, H, 2 * e).transpose(1, 2)
        k, v = kv[..., :e], kv[..., e:]  # [b, H, S, e]
        T = len(pos)
        q = (xn[:, pos].reshape(b * T, D) @ P["w_q"]).view(b, T, H, e).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)  # [b, H, T, S]
        A = scores.masked_fill(P["future"], float("-inf")).softmax(-1)  # [b, H, t, s]
        z = (A @ v).transpose(1, 2).reshape(b * T, H * e)
        resid = (x[:, pos, :-1] + (z @ P["w_o"]).view(b, T, -1)
                 + (A.sum(1) @ x[..., -1:]) * P["b_O"] / H)
        return torch.cat([resid, x[:, pos, -1:]], dim=-1)

    # ------------------------------------------------------------------ edges
    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], chunk: int = 256) -> Tensor:
        """``Σ_b Σ_t A[b,t,i,j]²`` (DESIGN.md §4 step 8) for this batch, ``[k_out, k_in]``.

        ``A[b,t,i,j] = Σ_s g[b,s,:,i]·C⁺[j,:] h[b,s,j]`` with ``g`` the pullback evaluated at
        ``x_eval`` (the projected input). For attention the contraction with ``h`` is done
        term by term, without forming ``g``.
        """
        if self.kind == "attention":
            return self._attention_edge_squares(x_eval, h, C_pinv, out_basis, alphas, weights,
                                                chunk)
        if self.kind == "norm_attention":  # forward mode through the section's formula
            return forward_edge_squares(self.adapter, None, self.in_site, self.out_site, x_eval,
                                        h, C_pinv, out_basis, alphas=alphas, weights=weights,
                                        forward=self.forward)
        if self.kind in ("unembed", "linear"):  # constant Jacobian: A[b,t,i,j] = M[j,i] h[b,t,j]
            J = self.params["J"].double()
            C = (torch.eye(J.shape[1], dtype=torch.float64, device=h.device)
                 if out_basis is None else out_basis.double())
            M = C_pinv.double() @ J @ C  # [k_in, k_out]
            h2 = (h[:, self.params["rows_in_list"]].double() ** 2).sum((0, 1))  # [k_in]
            return (M.T ** 2) * h2[None, :]
        if self.kind == "mlp":
            return self._mlp_edge_squares(x_eval, h, C_pinv, out_basis, alphas, weights, chunk)
        k_out = (out_basis.shape[1] if out_basis is not None
                 else self.adapter.site_dim(self.out_site) + int(self.out_site.has_constant))
        E = torch.zeros(k_out, C_pinv.shape[0], dtype=torch.float64, device=h.device)
        for pb in self.pullbacks(x_eval, out_basis, alphas, weights, chunk):
            g_h = torch.einsum("brdm,jd->brjm", pb.g.double(), C_pinv)
            A = torch.einsum("brjm,brj->bmj", g_h, h[pb.samples][:, pb.in_rows])
            E.index_add_(0, pb.dirs, (A * A).sum(0))
        return E

    def _mlp_edge_squares(self, x, h, C_pinv, out_basis, alphas, weights, chunk):
        """``A[b,j,i] = (C⁺ J0 C)[j,i] + Σ_m T[(j,i),m] σ̄′[b,m]`` with
        ``T[(j,i),m] = (C⁺W̃_in)[j,m] (W̃_out C)[m,i]``, contracted with ``h`` directly
        (float64), without forming the pullback ``g``: one GEMM ``[(j, i), m] × [m, b]`` per
        block of samples (measured 1.5× faster on modadd than one ``[k_in, m] × [m, (b, i)]``
        product per sample block, which must first form ``σ̄′ ⊙ W̃_out C``), then the squares
        summed over samples with weights ``h[b,j]²``. ``T`` is built for blocks of ``j`` of at
        most 2²⁰ floats (17 of modadd's 110: 0.36 s against 0.42 s for all 110 at once)."""
        P = self.params
        d_out = self.adapter.site_dim(self.out_site) + int(self.out_site.has_constant)
        C = (torch.eye(d_out, dtype=torch.float64, device=x.device) if out_basis is None
             else out_basis.double())
        Cp = C_pinv.double()
        M0 = Cp @ P["j0"].double() @ C  # [k_in, k_out]
        CpW = Cp @ P["w_in"].double()  # [k_in, m]
        WoC = P["w_out_t"].double() @ C  # [m, k_out]
        k_in, (m, k_out) = CpW.shape[0], WoC.shape
        E = torch.zeros(k_in, k_out, dtype=torch.float64, device=x.device)
        j_block = max(1, min(k_in, 2**20 // max(1, k_out * m)))
        # σ̄′ with a row of ones under it, so that one GEMM adds M0: [T | m0] · [σ̄′; 1]
        # (adding it through addmm's input copied it into every block first: 6 % of the pass)
        B = x.shape[0]
        dbars = []
        for r in P["rows_in_list"]:
            d1 = torch.empty(m + 1, B, dtype=torch.float64, device=x.device)
            pre_t = P["w_in"].T @ x[:, r].T  # [m, B]: σ̄′ comes out in d1's layout (a
            # transposed copy of [B, m] took 8 ms on modadd)
            d1[:m] = _mean_derivative(P["act"], pre_t, alphas, weights)
            d1[m] = 1.0
            dbars.append(d1)  # [m + 1, B]
        # [(j, i), b] blocks of about 2²² floats (2145 samples on modadd) ran fastest; T and
        # the blocks are written into two buffers allocated once (a fresh 32 MB tensor per
        # block cost 7 % more here, in page faults)
        b_block = max(16, 2**22 // (j_block * k_out))
        T_buf = torch.empty(j_block * k_out * (m + 1), dtype=torch.float64, device=x.device)
        A_buf = torch.empty(j_block * k_out * min(b_block, B), dtype=torch.float64,
                            device=x.device)
        for j0 in range(0, k_in, j_block):
            js = slice(j0, min(k_in, j0 + j_block))
            nj = js.stop - js.start
            T = T_buf[:nj * k_out * (m + 1)].view(nj, k_out, m + 1)
            torch.mul(CpW[js, None, :], WoC.T[None], out=T[..., :m])
            T[..., m] = M0[js]
            T = T.view(nj * k_out, m + 1)
            for r, d1 in zip(P["rows_in_list"], dbars):
                h2_t = h[:, r, js].double().T.square()  # [nj, B]
                for start in range(0, B, b_block):
                    d = d1[:, start:start + b_block]
                    A = A_buf[:nj * k_out * d.shape[1]].view(nj * k_out, d.shape[1])
                    torch.mm(T, d, out=A).square_()
                    E[js] += torch.bmm(A.view(nj, k_out, -1),
                                       h2_t[:, start:start + b_block, None])[..., 0]
        return E.T

    def _attention_edge_squares(self, x, h, C_pinv, out_basis, alphas, weights, chunk):
        P = self.params
        dt = x.dtype
        H, scale = P["H"], P["scale"]
        d_out = self.adapter.site_dim(self.out_site) + 1
        C = (torch.eye(d_out, dtype=dt, device=x.device) if out_basis is None
             else out_basis.to(dt))
        Cp = C_pinv.to(dt)  # [j, d+1]
        U_d = C[:-1]
        O = torch.einsum("hed,dk->hek", P["W_O"], U_d)
        bU = P["b_O"] @ U_d / H
        PVj = torch.einsum("jd,hde,hek->hjk", Cp, P["wv"], O)  # [H, k_in, k]
        wk_j = torch.einsum("jd,hde->hje", Cp, P["wk"]) / scale
        wq_j = torch.einsum("jd,hde->hje", Cp, P["wq"]) / scale
        cp_const = Cp[:, -1]  # [k_in]
        CpC = Cp @ C  # [k_in, k]
        kk, kj = C.shape[1], Cp.shape[0]
        wk_jT, wq_jT = wk_j.transpose(1, 2), wq_j.transpose(1, 2)  # [H, e, k_in]
        Q = torch.cat([PVj, (cp_const[:, None] * bU)[None], CpC[None]]).transpose(
            0, 1).contiguous()  # [k_in, H + 2, k]
        E = torch.zeros(kj, kk, dtype=torch.float64, device=x.device)  # transposed at the end
        # [b, k_in, k] per chunk of about 2²⁰ floats (79 samples on modadd; measured fastest),
        # written into three buffers allocated once (6 % faster than fresh tensors)
        chunk = max(1, min(chunk, 2**20 // max(1, kk * kj), x.shape[0]))
        buf_paths, buf_coef, buf_sq = (torch.empty(chunk * kj * kk, dtype=dt, device=x.device)
                                       for _ in range(3))
        buf_p = torch.empty(chunk * H * x.shape[1] * kj, dtype=dt, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xb, hb = x[start:start + chunk], h[start:start + chunk].to(dt)
            b, S = hb.shape[:2]
            fwd = []
            for alpha, wgt in zip(alphas, weights):
                q, k, v, A = P["attention"](alpha * xb)  # [b, H, s, e], [b, H, t, s]
                vo = torch.einsum("bhse,hek->bhsk", v, O)
                kwq = (k.transpose(0, 1).reshape(H, b * S, -1) @ wq_jT).view(H, b, S, kj)
                fwd.append((wgt, alpha * xb[..., -1], q, A, vo, kwq.transpose(0, 1)))
            for t in P["out_pos"]:
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
                    # [j, H + 2, k], one product batched over j (a pass over [b, j, k] per
                    # term measured 1.3x slower)
                    coef = torch.cat([ah, ah.sum(1, keepdim=True), hb[:, t, None]], 1)
                    Ab += torch.bmm(coef.permute(2, 0, 1).contiguous(), Q,
                                    out=buf_coef[:b * kj * kk].view(kj, b, kk)).transpose(0, 1)
                    A_total = Ab if len(fwd) == 1 else (
                        wgt * Ab if A_total is None else A_total + wgt * Ab)
                A_total = A_total.double()
                sq = buf_sq[:A_total.numel()].view(A_total.shape) if dt == torch.float64 else None
                E += torch.mul(A_total, A_total, out=sq).sum(0)
        return E.T

    # ------------------------------------------------------------------ pullbacks
    def pullbacks(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                  weights: list[float], chunk: int = 256) -> Iterator[Pullback]:
        """Pullbacks of every output direction, evaluated at ``x`` (any input, e.g. the
        projection of the data onto a basis), in chunks of samples."""
        dt = x.dtype
        d_out = self.adapter.site_dim(self.out_site) + int(self.out_site.has_constant)
        C = (torch.eye(d_out, dtype=dt, device=x.device) if out_basis is None
             else out_basis.to(dt))
        dirs = torch.arange(C.shape[1], device=x.device)
        if self.kind == "norm_attention":  # autograd through the section's formula
            for start in range(0, x.shape[0], chunk):
                for pb in autograd_pullbacks(self.adapter, None, self.in_site, self.out_site,
                                             x[start:start + chunk], out_basis, alphas=alphas,
                                             weights=weights, forward=self.forward):
                    pb.samples = slice(start, start + pb.g.shape[0])
                    yield pb
            return
        if self.kind == "attention":
            yield from self._attention_pullbacks(x, C, dirs, alphas, weights, chunk)
            return
        P = self.params
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            for t, r in zip(P["out_rows"], P["rows_in_list"]):
                xt = xb[:, r]  # [b, d+1]
                if self.kind in ("unembed", "linear"):
                    g = (P["J"] @ C).expand(xt.shape[0], -1, -1)
                else:
                    pre = xt @ P["w_in"]
                    dbar = _mean_derivative(P["act"], pre, alphas, weights)
                    woc = P["w_out_t"] @ C  # [m, k]
                    g = P["j0"] @ C + torch.einsum("dm,bm,mk->bdk", P["w_in"], dbar, woc)
                yield Pullback(slice(start, start + xb.shape[0]), [r], t, dirs, g[:, None])

    def _attention_pullbacks(self, x, C, dirs, alphas, weights, chunk):
        P = self.params
        H, scale = P["H"], P["scale"]
        wq, wk, wv, W_O, b_O = P["wq"], P["wk"], P["wv"], P["W_O"], P["b_O"]
        U_d = C[:-1]  # the output constant (last row of C) only enters through g_t
        O = torch.einsum("hed,dk->hek", W_O, U_d)  # [H, e, k]
        bU = b_O @ U_d / H  # [k]
        PV = torch.einsum("hde,hek->hdk", wv, O)  # [H, d+1, k], sample independent
        wq_s, wk_s = wq / scale, wk / scale
        all_rows = list(range(self.n_pos))
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            fwd = [(wgt, alpha * xb[..., -1], *P["attention"](alpha * xb))
                   for alpha, wgt in zip(alphas, weights)]
            for j, t in enumerate(P["out_pos"]):
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


#: Sequences of a batch on which a closed form is checked against the model.
CHECK_ROWS = 256


def may_have_closed_form(adapter: Adapter, in_site: Site, out_site: Site) -> bool:
    """Whether the section's kind and the model's normalisation allow a closed form (its
    weights and positions are checked by :func:`recognise`). Reads no activations."""
    if in_site.kind == "logits" or in_site.layer is None:
        return False
    L = in_site.layer
    if (in_site.kind, out_site.kind) == ("resid_pre", "resid_mid") and out_site.layer == L:
        return True  # attention, with or without a LayerNorm/RMSNorm before it
    if not _no_norm(adapter):
        return False
    if out_site.kind == "logits":
        return in_site.kind == "resid_post" and L == adapter.n_layers - 1
    return out_site.layer == L and (in_site.kind, out_site.kind) in (
        ("resid_mid", "resid_post"), ("resid_mid", "mlp_post"), ("mlp_post", "resid_post"))


def recognise(adapter: Adapter, tokens: Tensor, in_site: Site, out_site: Site,
              x: Tensor, y: Tensor | None = None) -> ClosedFormSection | None:
    """The closed form of the section, if it has one and it reproduces the model's own
    forward pass and one vector-Jacobian product on this batch (``x``: the input site's
    vectors on ``tokens``; ``y``: the output site's, read here when not given; the first
    :data:`CHECK_ROWS` sequences are checked)."""
    if not may_have_closed_form(adapter, in_site, out_site):
        return None
    tokens, x = tokens[:CHECK_ROWS], x[:CHECK_ROWS]
    y_given = None if y is None else y[:CHECK_ROWS]
    n_pos = tokens.shape[1]
    in_pos, out_pos = in_site.resolve_positions(n_pos), out_site.resolve_positions(n_pos)
    cfg = adapter.model.cfg
    L = in_site.layer
    dt = x.dtype
    pair = (in_site.kind, out_site.kind)
    if pair == ("resid_pre", "resid_mid"):  # attention
        params = _attention_params(adapter, in_site, out_site, x, n_pos)
        if params is None:
            return None
        kind = "attention"
        if not _no_norm(adapter):
            norm = _norm_params(adapter, L, dt)
            if norm is None:
                return None
            params["norm"] = norm
            kind = "norm_attention"
        section = ClosedFormSection(kind, adapter, in_site, out_site, n_pos, params)
        y = _out_vectors(adapter, tokens, out_site, y_given)
        if not _close(section.forward(x), y):
            return None
    else:
        common = [p for p in out_pos if p in in_pos]
        if not common:
            return None
        out_rows = [out_pos.index(p) for p in common]
        rows_in_list = [in_pos.index(p) for p in common]
        params = {"out_rows": out_rows, "rows_in_list": rows_in_list,
                  "rows_in": torch.tensor(rows_in_list, device=x.device)}
        mlp_weights = _mlp_weights(adapter, L, dt) if out_site.layer == L else None
        if pair == ("resid_mid", "resid_post") and mlp_weights is not None:
            act, w_in, w_out, b_out = mlp_weights
            d = x.shape[-1]
            j0 = torch.eye(d, dtype=dt, device=x.device)
            j0[-1, :-1] = b_out
            params.update(act=act, w_in=w_in, j0=j0,
                          w_out_t=torch.cat([w_out, torch.zeros_like(w_out[:, :1])], 1))
            kind = "mlp"

            def formula(xr):
                return xr[:, :-1] + act(xr @ w_in) @ w_out + xr[:, -1:] * b_out
        elif pair == ("resid_mid", "mlp_post") and mlp_weights is not None:
            act, w_in, w_out, _ = mlp_weights
            m, d = w_out.shape
            j0 = torch.zeros(d + 1, m + d + 1, dtype=dt, device=x.device)
            j0[:, m:] = torch.eye(d + 1, dtype=dt, device=x.device)
            w_out_t = torch.zeros(m, m + d + 1, dtype=dt, device=x.device)
            w_out_t[:, :m] = torch.eye(m, dtype=dt, device=x.device)
            params.update(act=act, w_in=w_in, j0=j0, w_out_t=w_out_t)
            kind = "mlp"

            def formula(xr):
                return torch.cat([act(xr @ w_in), xr[:, :-1]], 1)
        elif pair == ("mlp_post", "resid_post") and mlp_weights is not None:
            _, _, w_out, b_out = mlp_weights
            m, d = w_out.shape
            J = torch.zeros(m + d + 1, d + 1, dtype=dt, device=x.device)
            J[:m, :d] = w_out
            J[m:, :] = torch.eye(d + 1, dtype=dt, device=x.device)
            J[-1, :d] = b_out
            params.update(J=J)
            kind = "linear"

            def formula(xr):
                return (xr @ J)[:, :-1]
        elif (in_site.kind == "resid_post" and L == adapter.n_layers - 1
              and out_site.kind == "logits"):
            if getattr(cfg, "output_logits_soft_cap", -1.0) not in (None, -1.0, 0.0):
                return None
            W_U, b_U = adapter.model.unembed.W_U, adapter.model.unembed.b_U
            J = torch.cat([W_U, b_U[None]]).detach().to(dt)  # [d+1, V]
            params.update(J=J)
            kind = "unembed"

            def formula(xr):
                return xr @ J
        else:
            return None
        y = _out_vectors(adapter, tokens, out_site, y_given)
        y = y[:, out_rows].reshape(-1, y.shape[-1])
        y = y if out_site.kind == "logits" else y[:, :-1]
        if not _close(formula(x[:, params["rows_in"]].reshape(-1, x.shape[-1])), y):
            return None
        section = ClosedFormSection(kind, adapter, in_site, out_site, n_pos, params)
    return section if _vjp_agrees(section, tokens, x) else None


@torch.no_grad()
def _out_vectors(adapter: Adapter, tokens: Tensor, out_site: Site, y: Tensor | None) -> Tensor:
    return adapter.read_sites(tokens, [out_site])[0] if y is None else y


def _vjp_agrees(section: ClosedFormSection, tokens: Tensor, x: Tensor, n: int = 4) -> bool:
    """One random output direction pulled back on a few samples, closed form vs autograd:
    the formula check alone cannot see a wrong derivative (e.g. another attention scale)."""

    adapter, n = section.adapter, min(n, x.shape[0])
    d_out = adapter.site_dim(section.out_site) + int(section.out_site.has_constant)
    u = torch.randn(d_out, 1, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(x.device, x.dtype)
    totals = []
    for source in (section.pullbacks(x[:n], u, [1.0], [1.0]),
                   autograd_pullbacks(adapter, tokens[:n], section.in_site, section.out_site,
                                      x[:n], u, alphas=[1.0], weights=[1.0])):
        total = torch.zeros_like(x[:n])
        for pb in source:
            total[pb.samples][:, pb.in_rows] += pb.g[..., 0]
        totals.append(total)
    return _close(totals[0], totals[1])


def _attention_params(adapter, in_site, out_site, x, n_pos) -> dict | None:
    cfg = adapter.model.cfg
    if (adapter.parallel or not adapter.pattern_before_output
            or str(getattr(cfg, "positional_embedding_type", "standard")) != "standard"
            or getattr(cfg, "attention_dir", "causal") != "causal"
            or float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
            or (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) != cfg.n_heads
            or in_site.resolve_positions(n_pos) != list(range(n_pos))):
        return None
    attn = adapter.model.blocks[in_site.layer].attn
    dt = x.dtype
    try:
        W = {k: getattr(attn, k).detach().to(dt) for k in
             ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")}
    except AttributeError:
        return None
    H, d, e = W["W_Q"].shape
    if getattr(cfg, "use_attn_scale", True) is False:
        scale = 1.0
    else:
        a_s = float(getattr(cfg, "attn_scale", -1.0))
        scale = a_s if a_s > 0 else e**0.5
    wq, wk, wv = (torch.cat([W[f"W_{n}"], W[f"b_{n}"][:, None]], 1) for n in "QKV")  # [H,d+1,e]
    mask = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device), 1)

    # q | k | v of every head from one matmul: [d+1, (3, H, e)], formed once
    w_qkv = torch.stack([wq, wk, wv]).permute(2, 0, 1, 3).reshape(d + 1, 3 * H * e)

    def attention(xt):  # xt: [b, P, d+1] -> q, k, v [b, H, P, e] (views), pattern [b, H, P, P]
        b, n = xt.shape[:2]
        qkv = (xt.reshape(b * n, d + 1) @ w_qkv).view(b, n, 3, H, e).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q @ k.transpose(-1, -2)) / scale
        return q, k, v, scores.masked_fill(mask, float("-inf")).softmax(-1)

    out_pos = out_site.resolve_positions(n_pos)
    return {"H": H, "scale": scale, "wq": wq, "wk": wk, "wv": wv, "W_O": W["W_O"],
            "b_O": W["b_O"], "attention": attention, "out_pos": out_pos}


def _norm_params(adapter: Adapter, L: int, dt: torch.dtype) -> dict | None:
    """The attention input's normalisation of layer ``L`` (``ln1``): LayerNorm or RMSNorm,
    with or without its weight and bias, else None."""
    kind = str(getattr(adapter.model.cfg, "normalization_type", ""))
    if kind not in ("LN", "LNPre", "RMS", "RMSPre"):
        return None
    try:
        ln = adapter.model.blocks[L].ln1
    except (AttributeError, IndexError, TypeError):
        return None
    eps = getattr(ln, "eps", None)
    eps = getattr(adapter.model.cfg, "eps", None) if eps is None else eps
    if not isinstance(eps, (int, float)):
        return None
    w = getattr(ln, "w", None) if not kind.endswith("Pre") else None
    b = getattr(ln, "b", None) if kind == "LN" else None
    return {"rms": kind.startswith("RMS"), "eps": float(eps),
            "w": None if w is None else w.detach().to(dt),
            "b": None if b is None else b.detach().to(dt)}


def _mlp_weights(adapter: Adapter, L: int, dt: torch.dtype):
    """``(act, [W_in; b_in], W_out, b_out)`` of an ungated, LayerNorm-free MLP, else None."""
    cfg = adapter.model.cfg
    act = _ACTIVATIONS.get(str(getattr(cfg, "act_fn", "")).lower())
    if act is None or getattr(cfg, "gated_mlp", False) or adapter.parallel:
        return None
    try:
        mlp = adapter.model.blocks[L].mlp
        w_in = torch.cat([mlp.W_in, mlp.b_in[None]]).detach().to(dt)  # [d+1, m]
        return act, w_in, mlp.W_out.detach().to(dt), mlp.b_out.detach().to(dt)
    except (AttributeError, TypeError):
        return None


def _k_matrix(out_basis: Tensor | None, d: int, device=None) -> Tensor:
    if out_basis is None:
        return torch.eye(d, dtype=torch.float64, device=device)
    C = out_basis.double()
    return C @ C.T


def _count_gram(rows: Float[Tensor, "n m"]) -> Float[Tensor, "m m"]:
    """``rowsᵀ rows`` in float64 for rows of 0s and 1s (ReLU's derivative), exactly: each
    entry is a count, which float32 holds exactly below 2²⁴, so the products run in float32
    (twice float64's rate) over chunks of fewer than 2²⁴ rows, summed in float64."""
    out = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    for c in rows.split(2**24 - 1):
        c32 = c.float()
        out += c32.T @ c32
    return out


def _chunked_gram(rows: Tensor, chunk: int = 512) -> Tensor:
    out = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    for c in rows.split(chunk):
        out += c.T @ c
    return out
