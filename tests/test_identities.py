"""DESIGN.md §4 step 6 on every architecture: the second moment of the LIB coordinates is
diag(Λ), and every kept direction has unit mean squared Jacobian norm. The Jacobian Gram is
recomputed here by brute force (full per-sample Jacobians), independently of the batched
vector-Jacobian products and closed forms the package uses."""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.adapters import get_adapter
from tl_degen.fitting import prepared
from tl_degen.sites import Site

N, N_POS = 10, 5


def brute_force_jacobian_gram(model, tokens, in_site, out_site, out_C):
    adapter = get_adapter(model)
    total = None
    for b in range(tokens.shape[0]):
        tok = tokens[b : b + 1]
        (x,) = adapter.read_sites(tok, [in_site])

        def f(xb, tok=tok):
            y = adapter.run(tok, read=out_site, write=(in_site, xb[None]))[0]
            return y if out_C is None else y @ out_C

        J = torch.autograd.functional.jacobian(f, x[0])  # [P_out, k, P_in, d]
        rows = J.reshape(-1, J.shape[-1])
        total = rows.T @ rows if total is None else total + rows.T @ rows
    return total / (tokens.shape[0] * x.shape[1])


@pytest.mark.parametrize("integration", ["gradient", "trapezoid", "gauss-legendre"])
def test_second_moment_and_unit_jacobian_norms(arch, model, integration):
    if arch == "llama":  # the closed-form unembedding against the model's own final norm
        M.exact_float64(model)
    tokens = M.random_tokens(N, N_POS)
    sites = [Site.parse(s) for s in M.mid_sites(arch)]
    if integration != "gradient" and arch not in ("native_relu", "gpt2"):
        pytest.skip("integration rules are exercised on two architectures")
    bases = tl_degen.fit_bases(model, tokens, sites, integration=integration, n_alpha=3,
                               threshold=1e-12, progress=False)
    for idx, site in enumerate(sites[:-1]):
        b = bases[site]
        lam = b.eigenvalues
        # (1) second moment of the coordinates = diag(Λ)
        x = tl_degen.site_activations(model, tokens, site).double().reshape(-1, b.d_site)
        xhat = b.to_coords(x)
        second = xhat.T @ xhat / xhat.shape[0]
        assert (second - torch.diag(lam)).abs().max() <= 1e-8 * lam.max(), site
        # (2) unit mean squared Jacobian norm of each kept direction
        if integration != "gradient":
            continue  # the brute force below takes the plain gradient
        out_site, out_basis = sites[idx + 1], bases[sites[idx + 1]]
        out_C = None if out_site.kind == "logits" else out_basis.C
        with prepared(model, torch.float64):
            Mp = brute_force_jacobian_gram(model, tokens, site, out_site, out_C)
        norms = (b.C_pinv @ Mp @ b.C_pinv.T).diagonal()
        keep = lam > 1e-6 * lam.max()
        assert (norms[keep] - 1).abs().max() < 1e-8, (site, norms)


def test_lib_and_pca_share_whitening_and_neuron_is_identity():
    model = M.build("native_relu")
    tokens = M.random_tokens(N, N_POS)
    sites = ["resid_pre.1", "resid_post.1:last"]
    neuron = tl_degen.fit_bases(model, tokens, sites, method="neuron", progress=False)
    b = neuron["resid_pre.1"]
    assert torch.equal(b.C, torch.eye(17, dtype=torch.float64)) and b.dropped.total == 0
    x = tl_degen.site_activations(model, tokens, "resid_pre.1").double().reshape(-1, 17)
    torch.testing.assert_close(b.eigenvalues, (x * x).mean(0))
    pca = tl_degen.fit_bases(model, tokens, sites, method="pca", progress=False)["resid_pre.1"]
    # PCA: unit directions, centered coordinates uncorrelated with variances = eigenvalues
    xc = pca.to_coords(x)
    torch.testing.assert_close(xc.T @ xc / xc.shape[0], torch.diag(pca.eigenvalues),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(pca.from_coords(xc), x, atol=1e-10, rtol=0)  # full rank here


def test_fit_is_independent_of_batch_size():
    model = M.build("gpt2", M.save_word_tokenizer(__import__("tempfile").mkdtemp()))
    tokens = M.random_tokens(30, N_POS)
    sites = ["resid_pre.1", "resid_mid.1", "mlp_post.1:last", "logits:last"]
    a, b = (tl_degen.fit_bases(model, tokens, sites, batch_size=bs, progress=False)
            for bs in (4, 30))
    for s in sites:
        for f in ("mean", "gram"):
            x, y = getattr(a[s], f), getattr(b[s], f)
            assert (x - y).abs().max() <= 1e-10 * y.abs().max(), (s, f)
        assert a[s].k == b[s].k
        lam = b[s].eigenvalues
        assert ((a[s].eigenvalues - lam).abs() <= 1e-8 * lam.max()).all(), s


def test_cut_gap_and_ambiguity():
    from tl_degen.basis import AMBIGUOUS_GAP, Dropped, cut_gap, numerical_null_cutoff

    v = torch.tensor([10.0, 1.0, 0.5, 1e-9, 1e-10], dtype=torch.float64)
    keep = v > 1e-3
    assert cut_gap(v, keep, 1e-3) == pytest.approx(0.5 / 1e-9)
    assert cut_gap(v, v > 0.7, 0.7) == pytest.approx(2.0)  # 1.0 kept, 0.5 dropped
    assert cut_gap(v, torch.ones(5, dtype=torch.bool), 1e-12) == pytest.approx(100.0)
    assert cut_gap(v, torch.ones(5, dtype=torch.bool), 0.0) == float("inf")
    assert not Dropped(activation_gap=1e9, jacobian_gap=AMBIGUOUS_GAP).ambiguous
    d = Dropped(jacobian=3, activation_gap=1e9, jacobian_gap=1.3)
    assert d.ambiguous and d.gap == 1.3 and "rank ambiguous" in str(d)
    assert numerical_null_cutoff(v, 4, 1e-16) == pytest.approx((4e-16) ** 2 * 10)


def test_fit_warns_where_the_cut_has_no_gap():
    """Λ of the unembedding's input decays without a gap on random data: a relative threshold
    in the middle of it warns, one below every Λ does not."""
    model = M.build("native_relu")
    tokens = M.random_tokens(24, 6)
    sites = ["resid_post.1:last", "logits:last"]
    lam = tl_degen.fit_bases(model, tokens, sites, threshold=0.0, progress=False)[
        "resid_post.1:last"].lambda_all[1:]
    middle = float((lam[len(lam) // 2] * lam[len(lam) // 2 + 1]).sqrt() / lam.max())
    with pytest.warns(tl_degen.AmbiguousRankWarning, match="resid_post.1:last"):
        b = tl_degen.fit_bases(model, tokens, sites, threshold=middle, progress=False)
    assert b["resid_post.1:last"].dropped.ambiguous
    assert "[rank ambiguous]" in repr(b) and "rank ambiguous at 1 site(s)" in repr(b)
    with warnings.catch_warnings(record=True) as said:  # once per process and set of sites
        warnings.simplefilter("always")
        tl_degen.fit_bases(model, tokens, sites, threshold=middle, progress=False)
    assert not [w for w in said if w.category is tl_degen.AmbiguousRankWarning]
    with warnings.catch_warnings():
        warnings.simplefilter("error", tl_degen.AmbiguousRankWarning)
        b = tl_degen.fit_bases(model, tokens, sites, threshold=0.0, progress=False)
    assert not b["resid_post.1:last"].dropped.ambiguous
