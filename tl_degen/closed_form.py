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
