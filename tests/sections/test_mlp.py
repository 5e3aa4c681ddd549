"""tl_degen.sections.mlp: the MLP Gram's factor equals autograd whatever the units do, and
ReLU's co-firing counts are exact."""

from __future__ import annotations

import pytest
import torch

from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections.mlp import _count_gram, gram_factor
from tl_degen.sections.plan import accumulate_jacobian_gram
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.toy import modadd


@pytest.mark.parametrize("units", ["as trained", "dead and duplicated"])
def test_mlp_factor_with_dead_and_duplicated_units_equals_autograd(units):
    """A unit that never fires (a zero row, left out of the factor) and a duplicated unit (two
    equal rows: ``G`` singular in exact arithmetic) give the Gram autograd gives."""
    sd = modadd.load_state_dict()
    if units != "as trained":
        sd = {k: v.clone() for k, v in sd.items()}
        w_in, b_in, w_out = (sd[f"blocks.0.mlp.{n}"] for n in ("W_in", "b_in", "W_out"))
        w_in[:, 0], b_in[0] = 0.0, -1.0  # unit 0 never fires
        w_in[:, 2], b_in[2], w_out[2] = w_in[:, 1], b_in[1], w_out[1]  # unit 2 = unit 1
    model = modadd.load_bridge(sd, dtype=torch.float64)
    adapter = get_adapter(model)
    in_site, out_site = Site.parse("resid_mid.0:last"), Site.parse("resid_post.0:last")
    tokens = modadd.tokens_for(modadd.all_pairs()[::37])
    out_C = torch.randn(adapter.d_model + 1, 9, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    results = []
    with prepared(model, torch.float64):
        (x,) = adapter.read_sites(tokens, [in_site])
        for closed in (True, False):
            acc = GramAccumulator(x.shape[-1])
            accumulate_jacobian_gram(adapter, tokens, in_site, out_site, x, out_C, acc,
                                     alphas=[1.0], weights=[1.0], closed_form=closed)
            results.append(acc.value)
    assert (results[0] - results[1]).abs().max() <= 1e-12 * results[1].abs().max()


@pytest.mark.parametrize("singular", [False, True])
def test_gram_factor_by_cholesky_or_eigh(singular, monkeypatch):
    """``LᵀL = G``: by Cholesky for a positive definite ``G`` (no eigendecomposition), by
    ``eigh`` where Cholesky meets a zero pivot (two equal rows, as duplicated units give)."""
    B = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    if singular:
        B[:, 1] = B[:, 0]  # equal columns: rows 0 and 1 of G = BᵀB are equal
    G = B.T @ B
    eighs = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: eighs.append(A.shape) or eigh(A))
    L = gram_factor(G)
    torch.testing.assert_close(L.T @ L, G, rtol=0, atol=1e-12)
    assert eighs == ([(3, 3)] if singular else [])
    if not singular:
        assert torch.equal(L, torch.triu(L))  # the Cholesky factor itself


@pytest.mark.parametrize("n", [1, 700, 5000])
def test_relu_counts_gram_is_exact(n):
    """ReLU's derivative is 0 or 1, so ``σ′ᵀσ′`` holds counts, which the float32 products
    give exactly: equal, bit for bit, to the float64 product and to a brute-force count."""
    g = torch.Generator().manual_seed(n)
    rows = (torch.rand(n, 37, generator=g, dtype=torch.float64) > 0.3).double()
    rows[:, 5] = 1.0  # a unit that always fires: its count is n
    counts = _count_gram(rows)
    assert counts.dtype == torch.float64
    assert torch.equal(counts, rows.T @ rows)
    brute = torch.tensor([[sum(int(a) & int(b) for a, b in zip(rows[:, i], rows[:, j]))
                           for j in (0, 5)] for i in (0, 5)], dtype=torch.float64)
    assert torch.equal(counts[[0, 5]][:, [0, 5]], brute)
    assert counts[5, 5] == n
