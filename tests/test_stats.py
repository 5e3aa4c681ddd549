import pytest
import torch

from tl_degen import DataError, NonFiniteError
from tl_degen.stats import GramAccumulator, MomentAccumulator, reusing_buffers, stack_factors


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e200])
def test_non_finite_rows_in_a_later_chunk_leave_the_accumulator_as_it_was(bad):
    """The check reads each chunk's sums of squares, not every row: a bad value in the
    second chunk of rows is found, said as such (1e200 overflows when squared), and nothing
    of the batch is merged."""
    acc = MomentAccumulator(3, name="resid_pre.0")
    good = torch.randn(700, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acc.update(good)
    before = (acc.count, acc._mean.clone(), acc._m2.clone(), acc._R.clone())
    rows = torch.randn(1200, 3, dtype=torch.float64)
    rows[900, 1] = bad
    message = "overflow float64 when squared" if bad == 1e200 else "1 NaN/Inf value"
    with pytest.raises(NonFiniteError, match=message):
        acc.update(rows)
    assert acc.count == before[0]
    for now, then in zip((acc._mean, acc._m2, acc._R), before[1:]):
        assert torch.equal(now, then)


# ---------------------------------------------------------------- square-root factors
def _known_spectrum(n=4000, d=12, decades=7, seed=0):
    """Rows whose centered scatter has singular values 1 … 10^-decades exactly (per √n):
    an orthogonal Q (n×d, orthogonal to the ones vector), a diagonal, a rotation."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    a -= a.mean(0)
    q = torch.linalg.qr(a).Q * n**0.5
    sv = torch.logspace(0, -decades, d, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    rows = q * sv @ rot.T + 3.0  # a mean far from zero, as activations have
    return torch.cat([rows, torch.ones(n, 1, dtype=torch.float64)], 1), sv**2


@pytest.mark.parametrize("batch_size", [97, 4000])
def test_factor_keeps_small_eigenvalues_the_gram_loses(batch_size):
    """Eigenvalues down to 1e-14 of the largest: from the factor within 1e-6 relative, from the
    formed Gram off by ~1e-3 (the issue's figure), a closed-form spectrum."""
    x, exact = _known_spectrum()
    acc = MomentAccumulator(x.shape[1])
    for chunk in x.split(batch_size):
        acc.update(chunk)
    F = acc.factor()
    torch.testing.assert_close(F.T @ F, acc.gram(), rtol=0, atol=1e-13)
    from_factor = torch.linalg.svdvals(F[:, :-1]) ** 2
    from_gram = torch.linalg.eigvalsh(acc.gram()[:-1, :-1]).flip(0).abs()
    rel = lambda v: ((v - exact) / exact).abs()  # noqa: E731
    assert rel(from_factor).max() < 1e-6, rel(from_factor)
    # what squaring the condition number costs (measured 1e-3 at 1e-14 of the largest)
    assert rel(from_gram)[-1] > max(1e-4, 100 * rel(from_factor)[-1])


def test_factor_merges_like_the_moments():
    x = _data()
    whole, a, b = (MomentAccumulator(x.shape[-1]) for _ in range(3))
    whole.update(x)
    a.update(x[:300])
    b.update(x[300:])
    a.merge(b)
    for center in (True, False):
        Fw, Fm = whole.factor(center), a.factor(center)
        torch.testing.assert_close(Fm.T @ Fm, Fw.T @ Fw, rtol=0, atol=1e-10)
        torch.testing.assert_close(Fw.T @ Fw, whole.gram(center), rtol=0, atol=1e-10)


def test_gram_accumulator_keeps_rows_as_a_factor_and_blocks_as_a_gram():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(700, 6, generator=g, dtype=torch.float64)
    block = torch.randn(6, 6, generator=g, dtype=torch.float64)
    block = block @ block.T
    acc = GramAccumulator(6)
    acc.add_rows(rows)
    acc.add_count(10)
    F, G = acc.parts()
    assert G is None
    torch.testing.assert_close(F.T @ F, rows.T @ rows / 10, rtol=1e-12, atol=1e-12)
    acc.add_matrix(block)
    F, G = acc.parts()
    torch.testing.assert_close(G, block / 10)
    torch.testing.assert_close(acc.value, (rows.T @ rows + block) / 10, rtol=1e-12, atol=1e-12)
    other = GramAccumulator(6)
    other.add_rows(rows[:5])
    other.add_count(1)
    acc.merge(other)
    torch.testing.assert_close(acc.value * 11, rows.T @ rows + rows[:5].T @ rows[:5] + block,
                               rtol=1e-12, atol=1e-10)


def test_stack_factors_leaves_out_zero_rows_exactly():
    """A factor of fewer rows than columns is padded with zero rows; they are left out of
    the QR (LAPACK was 9x slower over them) and the product RᵀR is the same."""
    g = torch.Generator().manual_seed(0)
    d = 40
    first = torch.randn(7, d, generator=g, dtype=torch.float64)
    R = stack_factors(torch.zeros(d, d, dtype=torch.float64), first)
    assert R.shape == (d, d) and not R[7:].any()  # 7 rows seen: the rest is padding
    more = torch.randn(5, d, generator=g, dtype=torch.float64)
    R2 = stack_factors(R, more)
    X = torch.cat([first, more])
    torch.testing.assert_close(R2.T @ R2, X.T @ X, rtol=1e-13, atol=1e-13)
    assert torch.equal(stack_factors(torch.zeros(d, d, dtype=torch.float64),
                                     torch.zeros(3, d, dtype=torch.float64)),
                       torch.zeros(d, d, dtype=torch.float64))


def test_factored_blocks_are_summed_then_formed_once():
    """Blocks ``U S Uᵀ`` under one key sum their ``S``; a new key, a read, a checkpoint's
    state and a merge form them: every way equals adding ``U S Uᵀ`` block by block; the
    factors are built once per key and let go once formed; a NaN in ``S`` is refused."""
    g = torch.Generator().manual_seed(0)
    d, n = 5, 7
    U1, U2 = (torch.randn(d, n, generator=g, dtype=torch.float64) for _ in range(2))
    blocks = []
    for _ in range(3):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        blocks.append(a + a.T)
    owner1, owner2 = object(), object()
    built = []

    def factors(U):
        built.append(U)
        return (U, U.sum())

    acc, ref = GramAccumulator(d), GramAccumulator(d)
    for U, owner, S in ((U1, owner1, blocks[0]), (U1, owner1, blocks[1]), (U2, owner2, blocks[2])):
        running, (U_kept, extra) = acc.factored_sum((owner,), lambda U=U: factors(U))
        assert U_kept is U and float(extra) == float(U.sum())
        running += S
        ref.add_matrix(U @ S @ U.T)
        acc.add_count(1)
        ref.add_count(1)
    assert len(built) == 2  # one build per key
    torch.testing.assert_close(acc.state()["sum"], ref.state()["sum"], rtol=1e-13, atol=0)
    assert acc._pending is None  # formed: S and the factors let go
    other = GramAccumulator(d)
    S, _ = other.factored_sum((owner1,), lambda: (U1,))
    S += blocks[0]
    other.add_count(1)
    ref.add_matrix(U1 @ blocks[0] @ U1.T)
    ref.add_count(1)
    torch.testing.assert_close(acc.merge(other).value, ref.value, rtol=1e-13, atol=0)
    bad = GramAccumulator(d)
    S, _ = bad.factored_sum((owner1,), lambda: (U1,))
    S[0, 0] = float("nan")
    bad.add_count(1)
    with pytest.raises(NonFiniteError):
        _ = bad.value


def test_factored_sums_finish_once_and_reuse_the_buffer():
    """``finish`` (a linear map) is applied once, to the summed ``S``, before it is formed:
    the same as mapping each batch's block. Inside ``reusing_buffers`` the next key gets the
    folded ``S`` back, zeroed; outside, every key gets a fresh one."""
    g = torch.Generator().manual_seed(1)
    d, n = 4, 6
    U = torch.randn(d, n, generator=g, dtype=torch.float64)
    H = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = H + H.T
    blocks = [torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(3)]
    blocks = [b + b.T for b in blocks]

    def finish(S, factors):
        assert factors[0] is U
        S.mul_(H)

    ref = GramAccumulator(d)
    for b in blocks:
        ref.add_matrix(U @ (b * H) @ U.T)
    ref.add_count(1)
    with reusing_buffers():
        values, buffers = [], []
        for owner in (object(), object()):  # two accumulators, one after the other
            acc = GramAccumulator(d)
            for b in blocks:
                S, _ = acc.factored_sum((owner,), lambda: (U,), finish)
                S += b
            acc.add_count(1)
            buffers.append(S)
            values.append(acc.value)
    assert buffers[1] is buffers[0]  # the first's S, zeroed and used again
    for value in values:
        torch.testing.assert_close(value, ref.value, rtol=1e-13, atol=0)
    acc = GramAccumulator(d)
    S, _ = acc.factored_sum((object(),), lambda: (U,))
    assert S is not buffers[0] and not S.any()  # outside: fresh
