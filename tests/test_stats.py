import pytest
import torch

from tl_degen import DataError, NonFiniteError
from tl_degen.stats import GramAccumulator, MomentAccumulator


def _data(n=1000, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, d - 1, generator=g, dtype=torch.float64) * 3 + 50  # large mean
    return torch.cat([x, torch.ones(n, 3, 1, dtype=torch.float64)], -1)


def _brute(x):
    rows = x.reshape(-1, x.shape[-1])
    mu = rows.mean(0)
    xt = rows.clone()
    xt[:, :-1] -= mu[:-1]
    return mu, xt.T @ xt / rows.shape[0], rows.T @ rows / rows.shape[0]


def test_mean_and_gram_match_brute_force():
    x = _data()
    acc = MomentAccumulator(x.shape[-1])
    acc.update(x)
    mu, g_centered, g_raw = _brute(x)
    assert acc.count == x.shape[0] * x.shape[1]
    torch.testing.assert_close(acc.mean, mu, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.gram(), g_centered, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc.gram(center=False), g_raw, rtol=1e-10, atol=0)
    g = acc.gram()
    assert g[-1, -1] == 1 and g[-1, :-1].abs().max() == 0 and acc.mean[-1] == 1


@pytest.mark.parametrize("batch_size", [1, 7, 64, 333, 1000])
def test_batch_size_independent(batch_size):
    x = _data()
    whole = MomentAccumulator(x.shape[-1])
    whole.update(x)
    parts = MomentAccumulator(x.shape[-1])
    for chunk in x.split(batch_size):
        parts.update(chunk)
    scale = whole.gram().abs().max()
    assert (parts.mean - whole.mean).abs().max() <= 1e-10 * whole.mean.abs().max()
    assert (parts.gram() - whole.gram()).abs().max() <= 1e-10 * scale


def test_merge_equals_single_pass():
    x = _data()
    a, b, whole = (MomentAccumulator(x.shape[-1]) for _ in range(3))
    a.update(x[:300])
    b.update(x[300:])
    whole.update(x)
    a.merge(b)
    torch.testing.assert_close(a.gram(), whole.gram(), rtol=1e-10, atol=1e-10)
    ja, jb, jw = (GramAccumulator(4) for _ in range(3))
    g = torch.randn(50, 4, dtype=torch.float64)
    ja.add_rows(g[:20]), jb.add_rows(g[20:]), jw.add_rows(g)
    for acc, n in ((ja, 20), (jb, 30), (jw, 50)):
        acc.add_count(n)
    torch.testing.assert_close(ja.merge(jb).value, jw.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jw.value, g.T @ g / 50, rtol=1e-12, atol=1e-12)


def test_errors():
    acc = MomentAccumulator(3, name="resid_pre.0")
    with pytest.raises(DataError, match="no data"):
        _ = acc.mean
    with pytest.raises(DataError, match="expected vectors of size 3"):
        acc.update(torch.ones(2, 4))
    bad = torch.ones(2, 3)
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf value\\(s\\) in activations at resid_pre.0"):
        acc.update(bad)
    with pytest.raises(NonFiniteError, match="Jacobians"):
        GramAccumulator(3).add_rows(torch.full((2, 3), float("inf")))
