"""Agreement with the reference implementation on the modular-addition model (DESIGN.md §5).

Reads ``../shared/reference/rib_modadd/seed0`` and skips when it is absent. Reference layer
names map to sites as ``ln1.0 = resid_pre.0``, ``ln2.0 = resid_mid.0:last``,
``unembed = resid_post.0:last``, ``output = logits:last``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tl_degen
from tests.gram_route import gram_factor
from tl_degen.adapters import get_adapter
from tl_degen.basis import Threshold, lib_rotation, whiten
from tl_degen.model_state import prepared
from tl_degen.sections.plan import accumulate_jacobian_gram
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
LAYERS = {"ln1.0": "resid_pre.0", "ln2.0": "resid_mid.0:last", "unembed": "resid_post.0:last"}
REFERENCE_THRESHOLD = Threshold.absolute(1e-15)


@pytest.fixture(scope="module")
def setting(reference_dir):
    """The bridge on TransformerLens 4; the HookedTransformer on 3.x (whose own bridge
    distributes b_O differently, see tests/test_backends.py)."""
    from tests.models import HAS_HOOKED_TRANSFORMER

    sd = modadd.load_state_dict(reference_dir / "model.safetensors")
    loader = modadd.load_hooked_transformer if HAS_HOOKED_TRANSFORMER else modadd.load_bridge
    model = loader(sd)
    train, _ = modadd.train_test_split()
    return model, modadd.tokens_for(train)


@pytest.fixture(scope="module")
def lib(setting, reference_dir):
    model, tokens = setting
    bases = tl_degen.fit_bases(model, tokens, SITES, batch_size=4000,
                               threshold=REFERENCE_THRESHOLD, progress=False)
    return bases, load_file(str(reference_dir / "lib_graph.safetensors"))


@pytest.fixture(scope="module")
def pca(setting, reference_dir):
    model, tokens = setting
    bases = tl_degen.fit_bases(model, tokens, SITES, method="pca", batch_size=4000,
                               threshold=REFERENCE_THRESHOLD, progress=False)
    return bases, load_file(str(reference_dir / "pca_graph.safetensors"))


def ref_lambda(ref, layer):
    """Reference Λ: constant first, then (stored in solver order) sorted descending."""
    lam = ref[f"{layer}/Lambda"]
    return torch.cat([lam[:1], lam[1:].sort(descending=True).values])


def degenerate_groups(lam: torch.Tensor, rtol: float) -> list[list[int]]:
    """Runs of consecutive non-constant directions whose Λ agree within ``rtol``."""
    groups = [[0]]
    for i in range(1, len(lam)):
        if i > 1 and abs(lam[i] - lam[i - 1]) <= rtol * abs(lam[i - 1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def column_error(ours: torch.Tensor, ref: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per-column error of ``ours`` against ``ref`` up to sign, and up to rotation inside
    groups of (near-)equal Λ, relative to each reference column's largest entry."""
    errs = torch.zeros(ref.shape[1], dtype=torch.float64)
    for g in degenerate_groups(lam, 1e-3):
        a, r = ours[:, g], ref[:, g]
        u, _, vh = torch.linalg.svd(a.T @ r)  # orthogonal Procrustes (a sign for one column)
        errs[g] = ((a @ (u @ vh) - r).abs().max(0).values / r.abs().max(0).values)
    return errs


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("which", ["lib", "pca"])
def test_means_and_grams(which, layer, lib, pca):
    bases, ref = lib if which == "lib" else pca
    b = bases[LAYERS[layer]]
    for field in ("mean", "gram"):
        ours, theirs = getattr(b, field), ref[f"{layer}/{field}"]
        assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-10, field


def coordinate_error(x: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """RMS error of the coordinates ``x C`` on the data, up to sign, per direction, relative
    to the reference coordinate's RMS."""
    a, r = x @ ours, x @ ref
    a = a * torch.sign((a * r).sum(0))
    return (a - r).pow(2).mean(0).sqrt() / r.pow(2).mean(0).sqrt()


@pytest.mark.parametrize("layer, raw_tol", [("ln2.0", None), ("unembed", 1e-3)])
def test_lib_lambda_and_C(layer, raw_tol, lib, setting):
    """Λ within 1e-4 and the LIB coordinates of the data within 1e-6. Raw entries of C at
    resid_mid are not compared: off the data span they are set by directions the reference
    resolved from its Gram's noise floor (eigenvalue ~1e-15 absolute), which our square-root
    statistics keep as real, tiny directions of the data; the data never visits the
    difference (the coordinates agree)."""
    bases, ref = lib
    b, lam = bases[LAYERS[layer]], ref_lambda(ref, layer)
    n = int((lam > 1e-8 * lam.max()).sum())
    rel = (b.eigenvalues[:n] - lam[:n]).abs() / lam[:n]
    assert rel.max() < 1e-4, rel
    model, tokens = setting
    x = tl_degen.site_activations(model, tokens, LAYERS[layer]).double().reshape(-1, b.d_site)
    assert coordinate_error(x, b.C[:, :n], ref[f"{layer}/C"][:, :n]).max() < 1e-6
    if raw_tol is not None:
        assert column_error(b.C[:, :n], ref[f"{layer}/C"][:, :n], lam[:n]).max() < raw_tol


def test_lib_resid_pre_exact_given_reference_downstream_basis(setting, lib):
    """resid_pre's LIB depends on resid_mid's whole basis, including directions at the
    float64 noise floor (Λ ~ 1e-15) that each implementation resolves differently. Fed the
    reference's resid_mid C, our resid_pre computation reproduces the reference exactly."""
    model, tokens = setting
    bases, ref = lib
    adapter = get_adapter(model)
    pre, mid = Site.parse("resid_pre.0"), Site.parse("resid_mid.0:last")
    jac = GramAccumulator(129)
    with prepared(model, torch.float64):
        x = tl_degen.site_activations(model, tokens, pre, batch_size=4000)
        accumulate_jacobian_gram(adapter, tokens, pre, mid, x, ref["ln2.0/C"], jac,
                                 alphas=[1.0], weights=[1.0])
    b = bases["resid_pre.0"]
    wh = whiten(b.mean, gram_factor(b.gram), center=True, has_constant=True,
                threshold=REFERENCE_THRESHOLD)
    rot = lib_rotation(wh, *jac.parts(), constant_first=True, threshold=REFERENCE_THRESHOLD)
    C, lam_ours = rot.C, rot.eigenvalues
    lam = ref_lambda(ref, "ln1.0")
    n = int((lam > 1e-8 * lam.max()).sum())
    assert ((lam_ours[:n] - lam[:n]).abs() / lam[:n]).max() < 1e-8
    assert column_error(C[:, :n], ref["ln1.0/C"][:, :n], lam[:n]).max() < 1e-3


def test_lib_resid_pre_end_to_end(lib, setting, reference_dir):
    """End to end, the leading resid_pre directions (Λ > 1e-5·max) agree with the reference
    to 1e-4. Smaller ones (down to 1e-8·max) depart by up to ~1e-2 (measured 9e-3): the
    reference's own arithmetic (Grams formed and eigendecomposed, its activation cut inside
    the Gram's noise floor; tests/gram_route.py reproduces it to 1e-3) moves those Λ by more
    than that (measured 4e-2) under a function-preserving change of residual basis plus
    rescaled neurons, while ours stays put (measured 3e-11): the reference is the one that
    moves."""
    from tests.gram_route import gram_route_lambdas
    from tl_degen import reparam

    bases, ref = lib
    b, lam = bases["resid_pre.0"], ref_lambda(ref, "ln1.0")
    rel = (b.eigenvalues[: len(lam)] - lam[: len(b.eigenvalues)]).abs() / lam[: len(b.eigenvalues)]
    lead = int((lam > 1e-5 * lam.max()).sum())
    tail = int((lam > 1e-8 * lam.max()).sum())
    assert rel[:lead].max() < 1e-4, rel[:lead]
    departure = float(rel[:tail].max())
    assert departure < 2e-2

    from tests.models import HAS_HOOKED_TRANSFORMER

    _, tokens = setting
    loader = modadd.load_hooked_transformer if HAS_HOOKED_TRANSFORMER else modadd.load_bridge
    model = loader(modadd.load_state_dict(reference_dir / "model.safetensors"),
                   dtype=torch.float64)  # exact reparameterisations need float64
    other = reparam.rescale_neurons(reparam.change_residual_basis(model, seed=1),
                                    seed=2)

    def moved(a, b):
        return float(((a[:tail] - b[:tail]).abs() / b[:tail].abs()).max())

    ours = [tl_degen.fit_bases(m, tokens, SITES, batch_size=4000, threshold=REFERENCE_THRESHOLD,
                               progress=False)["resid_pre.0"].lambda_all for m in (model, other)]
    theirs = [gram_route_lambdas(m, tokens, SITES, REFERENCE_THRESHOLD)["resid_pre.0"]
              for m in (model, other)]
    assert moved(theirs[0], lam) < 3e-3  # the emulation is the reference's arithmetic
    assert moved(ours[1], ours[0]) < 1e-8
    assert moved(theirs[1], theirs[0]) > 2 * departure


def test_reference_top_lambdas_and_kept_counts(lib):
    bases, _ = lib
    expected = {"resid_pre.0": [1.1676e5, 1.8097e4, 4.0830e3],
                "resid_mid.0:last": [2.9586e5, 1.6416e4, 5.0354e3],
                "resid_post.0:last": [2.1724e5, 9.2868e3, 5.3061e3]}
    for site, top in expected.items():
        torch.testing.assert_close(bases[site].eigenvalues[:3],
                                   torch.tensor(top, dtype=torch.float64), rtol=1e-4, atol=0)
    # DESIGN.md §5: the reference kept 115 / 110 / 116; an absolute 1e-15 cut lies in the
    # float64 noise floor, so counts may differ by a few between correct implementations.
    kept = [bases[s].k for s in SITES[:3]]
    assert all(abs(a - b) <= 11 for a, b in zip(kept, [115, 110, 116])), kept
    assert bases["logits:last"].k == 114


@pytest.mark.parametrize("layer", list(LAYERS))
def test_pca_basis(layer, pca):
    bases, ref = pca
    b = bases[LAYERS[layer]]
    ref_C = ref[f"{layer}/C"]
    ev = torch.linalg.eigvalsh(ref[f"{layer}/gram"][:-1, :-1]).flip(0)
    lam = torch.cat([torch.ones(1, dtype=torch.float64), ev])[: ref_C.shape[1]]
    n = int((lam > 1e-8 * lam.max()).sum())
    rel = (b.eigenvalues[:n] - lam[:n]).abs() / lam[:n]
    assert rel.max() < 1e-8
    assert column_error(b.C[:, :n], ref_C[:, :n], lam[:n]).max() < 1e-3
