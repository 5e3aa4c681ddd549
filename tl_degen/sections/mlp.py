"""Position-wise sections in closed form: MLPs and linear maps (DESIGN.md §8).

* **MLP** ``resid_mid.L → resid_post.L`` in a block without a normalisation before the MLP:
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
* **Linear** ``f(x̃) = x̃ J`` for every row: out of the MLP hidden site
  ``mlp_post.L → resid_post.L`` (``J = [[W_out, 0], [I, 0], [b_out, 1]]``) and the
  unembedding ``resid_post.(n_layers-1) → logits`` without a final normalisation
  (``J = [W_U; b_U]``).

All act per position, so only positions in both sites contribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.autograd import Pullback
from tl_degen.sections.base import Section
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

__all__ = ["ACTIVATIONS", "gram_factor", "PositionwiseSection", "MLPSection", "MLPHiddenSection",
           "LinearSection", "mean_derivative"]

#: Activation functions by TransformerLens ``act_fn`` name.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def mean_derivative(act, pre: Tensor, alphas: list[float], weights: list[float]) -> Tensor:
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


def gram_factor(G: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """``L`` with ``LᵀL = G`` for a positive semi-definite ``G``: its upper Cholesky factor
    where ``G`` is positive definite (much cheaper than an eigendecomposition), else
    ``diag(√λ) Vᵀ`` from ``G = V diag(λ) Vᵀ`` (a singular ``G``: e.g. units that always fire
    together), negative rounding in ``λ`` clamped to 0."""
    L, info = torch.linalg.cholesky_ex(G, upper=True)
    if int(info) != 0:
        evals, vecs = torch.linalg.eigh(G)
        L = vecs.T * evals.clamp_min(0.0).sqrt()[:, None]
    return L


class PositionwiseSection(Section):
    """A section that maps each position on its own: output position ``out_rows[r]`` (an
    index into the output site's positions) is a function of input position ``in_rows[r]``
    alone. Subclasses implement :meth:`forward_rows`."""

    closed_form = True
    route_suffix = " (section formula)"

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 device: torch.device):
        super().__init__(adapter, in_site, out_site, n_pos)
        in_pos, out_pos = in_site.resolve_positions(n_pos), out_site.resolve_positions(n_pos)
        common = [p for p in out_pos if p in in_pos]
        self.out_rows = [out_pos.index(p) for p in common]
        self.in_rows = [in_pos.index(p) for p in common]
        self._in_rows = torch.tensor(self.in_rows, dtype=torch.long, device=device)

    def _rows(self, x: Tensor) -> Tensor:
        """The input rows the section reads, ``[batch · n_rows, d_in]``."""
        return x[:, self._in_rows].reshape(-1, x.shape[-1])

    def forward_rows(self, x: Float[Tensor, "batch n_in d_in"]
                     ) -> Float[Tensor, "batch n_rows d_out"]:
        """The output at the positions ``out_rows``, from the input at ``in_rows``."""
        raise NotImplementedError

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor | None:
        if len(self.out_rows) != self.n_out_pos:
            return None
        return self.forward_rows(x)


class LinearSection(PositionwiseSection):
    """``f(x̃) = x̃ J`` at every position: the same Jacobian ``J`` (``[d_in, d_out]``) for
    every row, so ``Σ_r J K Jᵀ = n (J C)(J C)ᵀ`` and the edges are ``(C⁺ J C)²`` weighted by
    ``Σ h²``."""

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int,
                 J: Float[Tensor, "d_in d_out"]):
        super().__init__(adapter, in_site, out_site, n_pos, J.device)
        self.J = J

    def forward_rows(self, x: Tensor) -> Tensor:
        return x[:, self._in_rows] @ self.J  # the last column of J carries the constant

    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        # added as the factor √n (J C)ᵀ: exact, and as precise as the rows (tl_degen.stats)
        n = self._rows(x).shape[0]
        J64 = self.J.double()
        JC = J64 if out_basis is None else J64 @ out_basis.double()
        acc.add_rows(n**0.5 * JC.T)
        acc.add_count(x.shape[0] * x.shape[1])

    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None) -> Tensor:
        # constant Jacobian: A[b,t,i,j] = M[j,i] h[b,t,j]
        M = C_pinv.double() @ self.J.double()  # [k_in, k_out]
        if out_basis is not None:
            M = M @ out_basis.double()
        h2 = (h[:, self.in_rows].double() ** 2).sum((0, 1))  # [k_in]
        return (M.T ** 2) * h2[None, :]

    def pullbacks(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                  weights: list[float], tokens: Tensor | None = None,
                  chunk: int = 256) -> Iterator[Pullback]:
        C = _out_matrix(self, out_basis, x.dtype, x.device)
        dirs = torch.arange(C.shape[1], device=x.device)
        JC = self.J @ C
        for start in range(0, x.shape[0], chunk):
            b = min(chunk, x.shape[0] - start)
            for t, r in zip(self.out_rows, self.in_rows):
                yield Pullback(slice(start, start + b), [r], t, dirs,
                               JC.expand(b, -1, -1)[:, None])


class MLPSection(PositionwiseSection):
    """``f(x) = x + σ(x̃ W̃_in) W_out + c b_out`` at every position (the module docstring),
    ``resid_mid.L → resid_post.L``.

    Args:
        act: the activation function.
        w_in: ``W̃_in = [W_in; b_in]``, ``[d + 1, m]``.
        w_out_t: ``W̃_out``, ``[m, d_out]``.
        j0: ``J0``, the Jacobian's constant part, ``[d + 1, d_out]``.
    """

    def __init__(self, adapter: Adapter, in_site: Site, out_site: Site, n_pos: int, *,
                 act: Callable[[Tensor], Tensor], w_in: Tensor, w_out_t: Tensor, j0: Tensor):
        super().__init__(adapter, in_site, out_site, n_pos, w_in.device)
        self.act, self.w_in, self.w_out_t, self.j0 = act, w_in, w_out_t, j0

    def _hidden(self, xr: Tensor) -> Tensor:
        pre = xr @ self.w_in
        # ReLU in place on the fresh product (no second [b, n, m] tensor)
        return pre.clamp_min_(0.0) if self.act is F.relu else self.act(pre)

    def forward_rows(self, x: Tensor) -> Tensor:
        xr = x[:, self._in_rows]  # [b, n_rows, d + 1]
        out = (xr[..., :-1] + self._hidden(xr) @ self.w_out_t[:, :-1]
               + xr[..., -1:] * self.j0[-1, :-1])
        return torch.cat([out, xr[..., -1:]], dim=-1)

    # ------------------------------------------------------------------ Jacobian Gram
    def add_jacobian_gram(self, x: Tensor, out_basis: Tensor | None, acc: GramAccumulator,
                          alphas: list[float], weights: list[float],
                          tokens: Tensor | None = None) -> None:
        acc.add_rows(self._factor(x, out_basis, alphas, weights))
        acc.add_count(x.shape[0] * x.shape[1])

    def _factor(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
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
        pre = xr @ self.w_in
        dbar = mean_derivative(self.act, pre, alphas, weights)
        dbar64 = dbar.double()
        d_out = self.j0.shape[1]
        C = (torch.eye(d_out, dtype=torch.float64, device=x.device) if out_basis is None
             else out_basis.double())
        A = self.w_out_t.double() @ C  # [m, k]
        J0C = self.j0.double() @ C  # [d_in, k]
        m, k = A.shape
        dA = dbar64.sum(0)[:, None] * A
        G = torch.empty(m + k, m + k, dtype=torch.float64, device=x.device)
        binary = self.act is F.relu and list(alphas) == [1.0] and list(weights) == [1.0]
        G[:m, :m] = (_count_gram(dbar) if binary else _chunked_gram(dbar64)) * (A @ A.T)
        G[:m, m:] = dA
        G[m:, :m] = dA.T
        G[m:, m:] = xr.shape[0] * torch.eye(k, dtype=torch.float64, device=x.device)
        T = torch.cat([self.w_in.double(), J0C], 1)  # [d_in, m + k]
        live = torch.cat([dbar64.abs().sum(0) > 0,  # units that never fire give zero rows
                          torch.ones(k, dtype=torch.bool, device=x.device)])
        if not bool(live.all()):
            G, T = G[live][:, live], T[:, live]
        return gram_factor(G) @ T.T

    # ------------------------------------------------------------------ edges
    def edge_squares(self, x_eval: Tensor, h: Tensor, C_pinv: Tensor, out_basis: Tensor | None,
                     alphas: list[float], weights: list[float], tokens: Tensor | None = None,
                     route: str | None = None) -> Tensor:
        """``A[b,j,i] = (C⁺ J0 C)[j,i] + Σ_m T[(j,i),m] σ̄′[b,m]`` with
        ``T[(j,i),m] = (C⁺W̃_in)[j,m] (W̃_out C)[m,i]``, contracted with ``h`` directly
        (float64), without forming the pullback ``g``: one GEMM ``[(j, i), m] × [m, b]`` per
        block of samples (``σ̄′ ⊙ W̃_out C`` is never formed), then the squares summed over
        samples with weights ``h[b,j]²``. ``T`` is built for blocks of ``j`` of at most 2²⁰
        floats, so that it stays in cache."""
        x = x_eval
        C = _out_matrix(self, out_basis, torch.float64, x.device)
        Cp = C_pinv.double()
        M0 = Cp @ self.j0.double() @ C  # [k_in, k_out]
        CpW = Cp @ self.w_in.double()  # [k_in, m]
        WoC = self.w_out_t.double() @ C  # [m, k_out]
        k_in, (m, k_out) = CpW.shape[0], WoC.shape
        E = torch.zeros(k_in, k_out, dtype=torch.float64, device=x.device)
        j_block = max(1, min(k_in, 2**20 // max(1, k_out * m)))
        # σ̄′ with a row of ones under it, so that one GEMM adds M0: [T | m0] · [σ̄′; 1]
        # (addmm's input would be copied into every block first)
        B = x.shape[0]
        dbars = []
        for r in self.in_rows:
            d1 = torch.empty(m + 1, B, dtype=torch.float64, device=x.device)
            pre_t = self.w_in.T @ x[:, r].T  # [m, B]: σ̄′ comes out in d1's layout (no
            # transposed copy of [B, m])
            d1[:m] = mean_derivative(self.act, pre_t, alphas, weights)
            d1[m] = 1.0
            dbars.append(d1)  # [m + 1, B]
        # [(j, i), b] blocks of about 2²² floats; T and the blocks are written into two
        # buffers allocated once (fresh tensors per block cost their page faults)
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
            for r, d1 in zip(self.in_rows, dbars):
                h2_t = h[:, r, js].double().T.square()  # [nj, B]
                for start in range(0, B, b_block):
                    d = d1[:, start:start + b_block]
                    A = A_buf[:nj * k_out * d.shape[1]].view(nj * k_out, d.shape[1])
                    torch.mm(T, d, out=A).square_()
                    E[js] += torch.bmm(A.view(nj, k_out, -1),
                                       h2_t[:, start:start + b_block, None])[..., 0]
        return E.T

    # ------------------------------------------------------------------ pullbacks
    def pullbacks(self, x: Tensor, out_basis: Tensor | None, alphas: list[float],
                  weights: list[float], tokens: Tensor | None = None,
                  chunk: int = 256) -> Iterator[Pullback]:
        C = _out_matrix(self, out_basis, x.dtype, x.device)
        dirs = torch.arange(C.shape[1], device=x.device)
        woc = self.w_out_t @ C  # [m, k]
        j0c = self.j0 @ C
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            for t, r in zip(self.out_rows, self.in_rows):
                dbar = mean_derivative(self.act, xb[:, r] @ self.w_in, alphas, weights)
                g = j0c + torch.einsum("dm,bm,mk->bdk", self.w_in, dbar, woc)
                yield Pullback(slice(start, start + xb.shape[0]), [r], t, dirs, g[:, None])


class MLPHiddenSection(MLPSection):
    """``resid_mid.L → mlp_post.L``: the output ``[σ(x̃ W̃_in), x, c]`` (the module
    docstring), ``W̃_out = [I_m, 0]``, ``J0 = [0, I_(d+1)]``."""

    def forward_rows(self, x: Tensor) -> Tensor:
        xr = x[:, self._in_rows]
        return torch.cat([self._hidden(xr), xr], dim=-1)


def _out_matrix(section: Section, out_basis: Tensor | None, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """The output basis ``C`` in ``dtype``, or the identity of the raw outputs."""
    if out_basis is None:
        return torch.eye(section.d_out, dtype=dtype, device=device)
    return out_basis.to(dtype)
