"""tl_degen.basis: whitening, thresholds, the LIB rotation and InteractionBasis, checked against
the identities of DESIGN.md §4 (steps 3, 5-7, 10), brute-force eigendecompositions and the
modadd model's own unembedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import BasisMismatchError, SiteError, TLDegenError
from tl_degen.basis import Threshold, cut_gap, lib_rotation, whiten
from tl_degen.toy import modadd

pytestmark = pytest.mark.filterwarnings("ignore::tl_degen.AmbiguousRankWarning")

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
F64 = torch.float64


@pytest.fixture(scope="module")
def modadd_lib():
    """The shipped modadd model in float64, 120 training pairs, its LIB bases."""
    model = modadd.load_bridge(dtype=F64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:120])
    return model, tokens, tl_degen.fit_bases(model, tokens, SITES, progress=False)


def _rows(model, tokens, basis) -> torch.Tensor:
    """The site's vectors over the data, one row per (sample, position): N·P rows."""
    return tl_degen.site_activations(model, tokens, basis.site).reshape(-1, basis.d_site)


def _unembed_with_bias() -> torch.Tensor:
    """∂logits/∂[resid, c] at resid_post.0:last: the unembedding, the bias as the constant's
    row (the section is linear, its Jacobian the same for every sample)."""
    sd = modadd.load_state_dict()
    return torch.cat([sd["unembed.W_U"], sd["unembed.b_U"][None]]).to(F64)


def _synthetic(n=60, d=6, rank=4, seed=0):
    """Site vectors [n, d + 1] (constant last) whose data part has the given rank, with their
    mean and the square-root factor of the centered Gram (factorᵀ factor = G)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g, dtype=F64) * torch.logspace(1, -1, rank, dtype=F64)
    data = z @ torch.randn(rank, d, generator=g, dtype=F64) + torch.randn(d, generator=g,
                                                                             dtype=F64)
    x = torch.cat([data, torch.ones(n, 1, dtype=F64)], 1)
    mean = x.mean(0)
    centered = torch.cat([data - mean[:-1], torch.ones(n, 1, dtype=F64)], 1)
    return x, mean, centered / n**0.5


# ---------------------------------------------------------------------------- LIB on modadd
def test_lib_coordinates_have_second_moment_diag_lambda(modadd_lib):
    """§4 step 6: over the fitted data (all N·P rows), x̂ = x C has second moment diag(Λ);
    and C⁺ C = I."""
    model, tokens, bases = modadd_lib
    for s in SITES[:-1]:
        b = bases[s]
        x = _rows(model, tokens, b)
        assert x.shape[0] == tokens.shape[0] * (3 if s == "resid_pre.0" else 1)
        xh = b.to_coords(x)
        second = xh.T @ xh / x.shape[0]
        root = b.eigenvalues.sqrt()
        torch.testing.assert_close(second / root[:, None] / root[None],
                                   torch.eye(b.k, dtype=F64), rtol=0, atol=1e-8, msg=s)
        torch.testing.assert_close(b.C_pinv @ b.C, torch.eye(b.k, dtype=F64), rtol=0, atol=1e-9)


def test_lib_directions_have_unit_jacobian_norm(modadd_lib):
    """§4 step 6 with M′ from the weights: resid_post.0:last → logits is the unembedding, so
    M′ = W̃ W̃ᵀ (W̃ = [W_U; b_U]); in LIB coordinates C⁺ M′ C⁺ᵀ has a unit diagonal and,
    outside the unrotated constant direction, is the identity."""
    _, _, bases = modadd_lib
    b = bases["resid_post.0:last"]
    W = _unembed_with_bias()
    J = b.C_pinv @ (W @ W.T) @ b.C_pinv.T
    torch.testing.assert_close(J.diag(), torch.ones(b.k, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(J[1:, 1:], torch.eye(b.k - 1, dtype=F64), rtol=0, atol=1e-8)
    assert b.k <= W.shape[1] + 1  # the Jacobian has rank ≤ d_vocab: the rest is type-2 null
    assert b.dropped.jacobian == b.d_site - b.k - b.dropped.activation


def test_pca_and_neuron_baselines_against_brute_force(modadd_lib):
    """§4 step 7: PCA eigenvalues are those of the centered covariance (numpy), constant 1
    first, and its coordinates have second moment diag(eigenvalues); the neuron basis is the
    identity with the raw second moments as eigenvalues."""
    model, tokens, _ = modadd_lib
    sites = ["resid_mid.0:last", "logits:last"]
    pca = tl_degen.fit_bases(model, tokens, sites, method="pca", progress=False)
    neuron = tl_degen.fit_bases(model, tokens, sites, method="neuron", progress=False)
    b = pca["resid_mid.0:last"]
    x = _rows(model, tokens, b)
    cov = np.cov(x[:, :-1].numpy().T, bias=True)
    expected = np.sort(np.linalg.eigvalsh(cov))[::-1][: b.k - 1].copy()
    assert float(b.eigenvalues[0]) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(b.eigenvalues[1:].numpy(), expected, rtol=0,
                               atol=1e-10 * expected[0])
    xh = b.to_coords(x)
    torch.testing.assert_close(xh.T @ xh / x.shape[0], torch.diag(b.eigenvalues), rtol=0,
                               atol=1e-10 * float(b.eigenvalues.max()))
    for s in sites:
        n = neuron[s]
        x = _rows(model, tokens, n)
        assert torch.equal(n.C, torch.eye(n.d_site, dtype=n.C.dtype)) and n.dropped.total == 0
        torch.testing.assert_close(n.eigenvalues, (x**2).mean(0), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------- whiten
def test_whitening_of_rank_deficient_data():
    """§4 step 3 on data of known rank: the null directions are dropped, the eigenvalues are
    the covariance's (numpy), the whitened Gram is the identity, R⁺ R = I, the constant
    direction comes first with x W[:, 0] = 1, and x R R⁺ gives the data back."""
    x, mean, factor = _synthetic(d=6, rank=4)
    wh = whiten(mean, factor, center=True, has_constant=True, threshold=Threshold.relative(1e-10))
    assert wh.n_dropped == 2 and wh.R.shape == (7, 5)
    cov = np.cov(x[:, :-1].numpy().T, bias=True)
    np.testing.assert_allclose(wh.all_eigenvalues[1:].numpy(),
                               np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=0, atol=1e-10)
    assert float(wh.all_eigenvalues[0]) == 1.0
    white = x @ wh.R
    torch.testing.assert_close(white.T @ white / x.shape[0], torch.eye(5, dtype=F64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(wh.R_pinv @ wh.R, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(x @ wh.W[:, 0], torch.ones(x.shape[0], dtype=F64), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(white @ wh.R_pinv, x, rtol=0, atol=1e-10)


def test_whitening_without_centering_uses_the_raw_second_moment():
    x, mean, _ = _synthetic(d=5, rank=5, seed=1)
    factor = x / x.shape[0] ** 0.5
    wh = whiten(mean, factor, center=False, has_constant=True, threshold=Threshold.relative(1e-12))
    raw = (x.T @ x / x.shape[0]).numpy()
    np.testing.assert_allclose(wh.all_eigenvalues.numpy(),
                               np.sort(np.linalg.eigvalsh(raw))[::-1], rtol=1e-10)
    white = x @ wh.R
    torch.testing.assert_close(white.T @ white / x.shape[0], torch.eye(6, dtype=F64), rtol=0,
                               atol=1e-10)


def test_absolute_threshold_cuts_at_its_value_and_reports_the_gap():
    x, mean, factor = _synthetic(d=5, rank=5, seed=2)
    cov = np.sort(np.linalg.eigvalsh(np.cov(x[:, :-1].numpy().T, bias=True)))[::-1]
    cut = float(np.sqrt(cov[2] * cov[3]))  # between the third and fourth eigenvalue
    wh = whiten(mean, factor, center=True, has_constant=True, threshold=Threshold.absolute(cut))
    assert wh.cutoff == cut and wh.n_dropped == 2 and wh.eigenvalues.shape == (4,)
    assert wh.gap == pytest.approx(cov[2] / cov[3], rel=1e-10)


# ---------------------------------------------------------------------------- Threshold, cut_gap
def test_threshold_cutoffs_and_coercion():
    eig = torch.tensor([-8.0, 2.0, 1e-9], dtype=F64)
    assert Threshold.relative(1e-3).cutoff(eig) == pytest.approx(8e-3)  # of the largest |λ|
    assert Threshold.absolute(1e-3).cutoff(eig) == 1e-3
    assert Threshold.relative(0.5).cutoff(torch.zeros(0, dtype=F64)) == 0.5
    assert Threshold() == Threshold.relative(1e-13)  # the documented default
    assert Threshold.coerce(1e-6) == Threshold(1e-6, "relative")
    t = Threshold.absolute(1e-15)
    assert Threshold.coerce(t) is t and str(t) == "absolute 1e-15"
    for bad in ("1e-6", None):
        with pytest.raises(TLDegenError, match="threshold must be a float"):
            Threshold.coerce(bad)
    for value in (-1.0, float("nan")):
        with pytest.raises(TLDegenError, match="non-negative"):
            Threshold.relative(value)
    with pytest.raises(TLDegenError, match="'relative' or 'absolute'"):
        Threshold(1e-3, "percent")


def test_cut_gap_is_smallest_kept_over_largest_dropped():
    values = torch.tensor([10.0, 5.0, 1.0, 0.01, 0.001], dtype=F64)
    keep = values > 0.1
    assert cut_gap(values, keep, 0.1) == pytest.approx(1.0 / 0.01)
    assert cut_gap(values, torch.ones(5, dtype=torch.bool), 1e-4) == pytest.approx(0.001 / 1e-4)
    assert cut_gap(values, torch.ones(5, dtype=torch.bool), 0.0) == float("inf")
    assert cut_gap(values, torch.zeros(5, dtype=torch.bool), 20.0) == 0.0  # nothing kept


# ---------------------------------------------------------------------------- lib_rotation
def test_lib_rotation_diagonalises_the_whitened_jacobian_gram():
    """§4 steps 5-6 on a random Jacobian factor F (M′ = FᵀF): Λ is M[0, 0] for the constant,
    then the eigenvalues of the rest of M = R⁺ M′ R⁺ᵀ (numpy); C⁺ C = I, x̂ has second moment
    diag(Λ), C⁺ M′ C⁺ᵀ has a unit diagonal; the formed-Gram path gives the same."""
    x, mean, factor = _synthetic(d=5, rank=5, seed=3)
    wh = whiten(mean, factor, center=True, has_constant=True, threshold=Threshold.relative(1e-12))
    F = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    Mp = F.T @ F
    r = lib_rotation(wh, F, None, constant_first=True, threshold=Threshold.relative(1e-12))
    C, C_pinv, lam = r[0], r[1], r[2]
    M_ = (wh.R_pinv @ Mp @ wh.R_pinv.T).numpy()
    assert float(lam[0]) == pytest.approx(M_[0, 0], rel=1e-12)
    np.testing.assert_allclose(lam[1:].numpy(), np.sort(np.linalg.eigvalsh(M_[1:, 1:]))[::-1],
                               rtol=1e-10)
    k = C.shape[1]
    assert k == 6 and C_pinv.shape == (6, 6)
    torch.testing.assert_close(C_pinv @ C, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    xh = x @ C
    torch.testing.assert_close(xh.T @ xh / x.shape[0], torch.diag(lam), rtol=0,
                               atol=1e-10 * float(lam.max()))
    torch.testing.assert_close((C_pinv @ Mp @ C_pinv.T).diag(), torch.ones(k, dtype=F64),
                               rtol=0, atol=1e-10)
    formed = lib_rotation(wh, F[:0], Mp, constant_first=True, threshold=Threshold.relative(1e-12))
    torch.testing.assert_close(formed[2], lam, rtol=1e-10, atol=0)
    torch.testing.assert_close(formed[0] @ formed[1], C @ C_pinv, rtol=0, atol=1e-8)


def test_lib_rotation_drops_jacobian_null_directions():
    """A Jacobian factor of rank 2: only the constant and two directions have Λ > 0 (type 2
    degeneracy cuts the rest); a zero Jacobian is an error, not an empty basis."""
    x, mean, factor = _synthetic(d=5, rank=5, seed=5)
    wh = whiten(mean, factor, center=True, has_constant=True, threshold=Threshold.relative(1e-12))
    g = torch.Generator().manual_seed(6)
    F = torch.randn(9, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)
    r = lib_rotation(wh, F, None, constant_first=True, threshold=Threshold.relative(1e-10))
    C, C_pinv, lam = r[0], r[1], r[2]
    assert C.shape == (6, 3) and lam.shape == (3,)
    torch.testing.assert_close(C_pinv @ C, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    # the kept directions span everything F sees: projecting onto them keeps x Fᵀ
    torch.testing.assert_close(x @ C @ C_pinv @ F.T, x @ F.T, rtol=0, atol=1e-9)
    with pytest.raises(SiteError, match="every Λ is zero"):
        lib_rotation(wh, torch.zeros(9, 6, dtype=F64), None, constant_first=True,
                     threshold=Threshold.relative(1e-10))


def test_lib_rotation_with_fewer_jacobian_rows_than_directions():
    """A factor of 2 rows for 5 non-constant directions (a batch with few outputs): the
    missing eigenvalues are zeros and are cut, the rest equal the formed-Gram path; an
    all-zero short factor is the "every Λ is zero" error, not a shape error."""
    x, mean, factor = _synthetic(d=5, rank=5, seed=7)
    wh = whiten(mean, factor, center=True, has_constant=True, threshold=Threshold.relative(1e-12))
    F = torch.randn(2, 6, generator=torch.Generator().manual_seed(8), dtype=F64)
    r = lib_rotation(wh, F, None, constant_first=True, threshold=Threshold.relative(1e-10))
    formed = lib_rotation(wh, F[:0], F.T @ F, constant_first=True,
                          threshold=Threshold.relative(1e-10))
    assert r[2].shape == formed[2].shape == (3,)  # the constant and two directions
    torch.testing.assert_close(r[2], formed[2], rtol=1e-10, atol=0)
    assert r[3].shape == (6,) and bool((r[3][3:] == 0).all())
    with pytest.raises(SiteError, match="every Λ is zero"):
        lib_rotation(wh, torch.zeros(2, 6, dtype=F64), None, constant_first=True,
                     threshold=Threshold.relative(1e-10))


# ---------------------------------------------------------------------------- InteractionBasis
def test_interaction_basis_properties_coordinates_and_repr(modadd_lib):
    model, tokens, bases = modadd_lib
    b, logits = bases["resid_mid.0:last"], bases["logits:last"]
    assert (b.d_site, logits.d_site) == (129, 114)  # d_model + the constant; d_vocab
    assert b.k == b.C.shape[1] == b.C_pinv.shape[0] == b.eigenvalues.shape[0]
    assert b.has_constant and not logits.has_constant and b.method == "lib"
    x = tl_degen.site_activations(model, tokens[:8], b.site)
    coords = b.to_coords(x)
    assert coords.shape == (8, 1, b.k)
    torch.testing.assert_close(b.to_coords(x[..., :-1]), coords, rtol=0, atol=0)
    projected = b.from_coords(coords)
    torch.testing.assert_close(projected, x @ b.C @ b.C_pinv, rtol=0, atol=1e-10)
    torch.testing.assert_close(b.from_coords(b.to_coords(projected)), projected, rtol=0,
                               atol=1e-8)  # a projection: applying it twice changes nothing
    with pytest.raises(BasisMismatchError, match="do not fit site"):
        b.to_coords(x[..., :-2])
    with pytest.raises(BasisMismatchError, match=f"expected {b.k} coordinates"):
        b.from_coords(coords[..., :-1])
    text = repr(b)
    assert text.startswith("InteractionBasis('resid_mid.0:last', method='lib'")
    assert f"d_site=129, kept={b.k}," in text
    top = [float(v) for v in text.split("top=[")[1].split("]")[0].split(", ")]
    np.testing.assert_allclose(top, b.eigenvalues[:3].numpy(), rtol=1e-3)
    assert f"{b.dropped.jacobian} Jacobian-null" in text


# ---------------------------------------------------------------------------- regressions
def test_unreachable_site_is_an_error():
    model = M.build("native_relu")
    with pytest.raises(SiteError, match="cannot see this site's positions"):
        tl_degen.fit_bases(model, M.random_tokens(8, 5),
                           ["resid_pre.1:last", "resid_mid.1:0", "logits:0"], progress=False)


def test_zero_threshold_never_divides_by_zero():
    model = M.build("native_relu")
    tokens = M.random_tokens(1, 5).repeat(4, 1)  # identical sequences: a rank-0 covariance
    bases = tl_degen.fit_bases(model, tokens, ["resid_pre.1:last", "resid_mid.1:last"],
                               threshold=tl_degen.Threshold.absolute(0.0), progress=False)
    for b in bases.values():
        assert torch.isfinite(b.C).all() and torch.isfinite(b.C_pinv).all()


def test_relative_threshold_ignores_the_units_of_the_data():
    """Scaling the embeddings scales every data eigenvalue: the kept set must not change."""
    sd = modadd.init_state_dict(modadd.ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64))
    tokens = modadd.tokens_for(modadd.all_pairs()[::50])
    kept = []
    for scale in (1.0, 1e-4):
        sd2 = dict(sd, **{"embed.W_E": sd["embed.W_E"] * scale,
                          "pos_embed.W_pos": sd["pos_embed.W_pos"] * scale})
        cfg = modadd.ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64)
        model = modadd.load_bridge(sd2, cfg=cfg, dtype=torch.float64)
        kept.append(tl_degen.fit_bases(model, tokens, ["resid_pre.0"], method="pca",
                                       threshold=1e-6, progress=False)["resid_pre.0"].k)
    assert kept[0] == kept[1]
