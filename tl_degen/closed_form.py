"""Closed-form Jacobian Grams for sections without autograd (DESIGN.md §8).

Two section shapes have Jacobians that need no backward passes:

* **MLP** ``resid_mid.L → resid_post.L`` in a block without a LayerNorm before the MLP:
  ``f(x) = x + σ(x W_in + c b_in) W_out + c b_out``. With ``x̃ = [x, c]``,
  ``W̃_in = [W_in; b_in]``, ``W̃_out = [W_out, 0]`` and ``J0 = I + e_c [b_out, 0]``, the
  Jacobian of one row is ``J = J0 + W̃_in D W̃_out`` with ``D = diag σ′(pre)``, so with
  ``K = C Cᵀ`` of the output basis and ``A = W̃_out K W̃_outᵀ``::

      Σ_r J_r K J_rᵀ = n J0 K J0ᵀ + (J0 K W̃_outᵀ diag(Σσ′) W̃_inᵀ + transpose)
                       + W̃_in (A ⊙ S) W̃_inᵀ,      S = Σ_r σ′_r σ′_rᵀ.

  Integrated gradients average ``D`` over ``α`` (``pre(αx̃) = α pre(x̃)``), so ``σ′`` is
  replaced by ``Σ_α w_α σ′(α pre)``.
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
checked against the model's own forward pass on the batch (relative error below 1e-5 in the
model's dtype); otherwise :func:`tl_degen.sections.accumulate_jacobian_gram` falls back to
autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["try_closed_form"]

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


def _act_derivative(act, pre: Tensor) -> Tensor:
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(p).sum(), p)
    return g


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e-5 if a.dtype == torch.float64 else 1e-3
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12))


def try_closed_form(
    adapter: Adapter, tokens: Tensor, in_site: Site, out_site: Site, x: Tensor,
    out_basis: Tensor | None, acc: GramAccumulator, alphas: list[float], weights: list[float],
) -> bool:
    """Add the batch's ``Σ J K Jᵀ`` in closed form if the section allows it; report whether."""
    if not _no_norm(adapter) or in_site.kind == "logits":
        return False
    n_pos = tokens.shape[1]
    in_pos, out_pos = in_site.resolve_positions(n_pos), out_site.resolve_positions(n_pos)
    common = [p for p in out_pos if p in in_pos]
    if not common:
        return False
    rows_in = torch.tensor([in_pos.index(p) for p in common], device=x.device)
    xr = x[:, rows_in].reshape(-1, x.shape[-1])  # [rows, d+1]
    cfg = adapter.model.cfg
    L = in_site.layer
    if (in_site.kind, out_site.kind) == ("resid_mid", "resid_post") and out_site.layer == L:
        act = _ACTIVATIONS.get(str(getattr(cfg, "act_fn", "")).lower())
        if act is None or getattr(cfg, "gated_mlp", False) or adapter.parallel:
            return False
        mlp = adapter.model.blocks[L].mlp
        w_in = torch.cat([mlp.W_in, mlp.b_in[None]]).detach().to(x.dtype)  # [d+1, m]
        w_out = mlp.W_out.detach().to(x.dtype)  # [m, d]
        b_out = mlp.b_out.detach().to(x.dtype)
        pre = xr @ w_in
        with torch.no_grad():
            (y,) = adapter.read_sites(tokens, [out_site])
        y = y[:, [out_pos.index(p) for p in common]].reshape(-1, y.shape[-1])[:, :-1]
        expected = xr[:, :-1] + act(pre) @ w_out + xr[:, -1:] * b_out
        if not _close(expected, y):
            return False
        dbar = sum(w * _act_derivative(act, a * pre) for a, w in zip(alphas, weights))
        d = x.shape[-1]
        w_out_t = torch.cat([w_out, torch.zeros_like(w_out[:, :1])], 1).double()  # [m, d+1]
        j0 = torch.eye(d, dtype=torch.float64, device=x.device)
        j0[-1, :-1] = b_out.double()
        K = _k_matrix(out_basis, d)
        w_in64, dbar64 = w_in.double(), dbar.double()
        A = w_out_t @ K @ w_out_t.T
        S = _chunked_gram(dbar64)
        t2 = j0 @ K @ w_out_t.T @ (dbar64.sum(0)[:, None] * w_in64.T)
        total = xr.shape[0] * (j0 @ K @ j0.T) + t2 + t2.T + w_in64 @ (A * S) @ w_in64.T
        acc.add_matrix(total)
        acc.add_count(x.shape[0] * x.shape[1])
        return True
    if (in_site.kind, out_site.kind) == ("resid_pre", "resid_mid") and out_site.layer == L:
        return _attention(adapter, tokens, in_site, out_site, x, out_basis, acc, alphas,
                          weights)
    if (in_site.kind == "resid_post" and in_site.layer == adapter.n_layers - 1
            and out_site.kind == "logits"):
        W_U, b_U = adapter.model.unembed.W_U, adapter.model.unembed.b_U
        if getattr(cfg, "output_logits_soft_cap", -1.0) not in (None, -1.0, 0.0):
            return False
        J = torch.cat([W_U, b_U[None]]).detach().to(x.dtype)  # [d+1, V]
        with torch.no_grad():
            (y,) = adapter.read_sites(tokens, [out_site])
        y = y[:, [out_pos.index(p) for p in common]].reshape(-1, y.shape[-1])
        if not _close(xr @ J, y):
            return False
        J64 = J.double()
        acc.add_matrix(xr.shape[0] * (J64 @ _k_matrix(out_basis, J.shape[1]) @ J64.T))
        acc.add_count(x.shape[0] * x.shape[1])
        return True
    return False


def _k_matrix(out_basis: Tensor | None, d: int) -> Tensor:
    if out_basis is None:
        return torch.eye(d, dtype=torch.float64)
    C = out_basis.double()
    return C @ C.T


def _chunked_gram(rows: Tensor, chunk: int = 512) -> Tensor:
    out = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    for c in rows.split(chunk):
        out += c.T @ c
    return out


def _attention(adapter, tokens, in_site, out_site, x, out_basis, acc, alphas, weights,
               chunk: int = 256) -> bool:
    cfg = adapter.model.cfg
    n_pos = tokens.shape[1]
    if (adapter.parallel or not adapter.pattern_before_output
            or str(getattr(cfg, "positional_embedding_type", "standard"))
            != "standard" or getattr(cfg, "attention_dir", "causal") != "causal"
            or float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
            or (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) != cfg.n_heads
            or in_site.resolve_positions(n_pos) != list(range(n_pos))):
        return False
    attn = adapter.model.blocks[in_site.layer].attn
    dt = x.dtype
    try:
        W = {k: getattr(attn, k).detach().to(dt) for k in
             ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")}
    except AttributeError:
        return False
    H, d, e = W["W_Q"].shape
    if getattr(cfg, "use_attn_scale", True) is False:
        scale = 1.0
    else:
        a_s = float(getattr(cfg, "attn_scale", -1.0))
        scale = a_s if a_s > 0 else e**0.5
    wq, wk, wv = (torch.cat([W[f"W_{n}"], W[f"b_{n}"][:, None]], 1) for n in "QKV")  # [H,d+1,e]
    out_pos = out_site.resolve_positions(n_pos)
    with torch.no_grad():
        (y,) = adapter.read_sites(tokens, [out_site])
    mask = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device), 1)

    def attention(xt):  # xt: [b, P, d+1] -> q, k, v, pattern [b, H, P, P]
        q, k, v = (torch.einsum("bpd,hde->bhpe", xt, w) for w in (wq, wk, wv))
        scores = torch.einsum("bhte,bhse->bhts", q, k) / scale
        return q, k, v, scores.masked_fill(mask, float("-inf")).softmax(-1)

    # the formula must reproduce the model's own resid_mid on this batch
    q, k, v, A = attention(x)
    c = x[..., -1]
    z = torch.einsum("bhts,bhse->bthe", A, v)
    resid = x[..., :-1] + torch.einsum("bthe,hed->btd", z, W["W_O"]) + \
        torch.einsum("bhts,bs->bt", A, c)[..., None] * W["b_O"] / H
    if not _close(resid[:, out_pos], y[..., :-1]):
        return False

    C = torch.eye(d + 1, dtype=dt, device=x.device) if out_basis is None else out_basis.to(dt)
    U_d = C[:-1]  # [d, k]; the last row of C (the output constant) only enters through g_t
    O = torch.einsum("hed,dk->hek", W["W_O"], U_d)  # [H, e, k]
    bU = W["b_O"] @ U_d / H  # [k]
    PV = torch.einsum("hde,hek->hdk", wv, O)  # [H, d+1, k], sample independent
    wq_s, wk_s = wq / scale, wk / scale
    for xb in x.split(chunk):
        forward = [(wgt, alpha * xb[..., -1], *attention(alpha * xb))
                   for alpha, wgt in zip(alphas, weights)]
        for t in out_pos:
            g_total = None
            for wgt, ca, q, k, v, A in forward:
                At = A[:, :, t]  # [b, H, s]
                w = torch.einsum("bhse,hek->bhsk", v, O) + ca[:, None, :, None] * bU
                beta = At[..., None] * (w - (At[..., None] * w).sum(2, keepdim=True))
                g = torch.einsum("bhs,hdk->bsdk", At, PV)
                g += torch.einsum("bhsk,bhd->bsdk", beta,
                                  torch.einsum("hde,bhe->bhd", wk_s, q[:, :, t]))
                g[:, :, -1] += torch.einsum("bhs,k->bsk", At, bU)
                kq = torch.einsum("bhsk,bhse->bhek", beta, k)
                g[:, t] += C + torch.einsum("hde,bhek->bdk", wq_s, kq)
                g_total = g if len(forward) == 1 else (
                    wgt * g if g_total is None else g_total + wgt * g)
            # rows: one gradient vector per (sample, input position, direction)
            acc.add_rows(g_total.transpose(-1, -2))
    acc.add_count(x.shape[0] * x.shape[1])
    return True
