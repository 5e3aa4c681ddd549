"""compare_bases: curves against patch_directions and the whole-site patch, invariance to
relabelling directions, bootstrap coverage on synthetic data, the plain math on hand-built
cases, round trips, and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.basis import InteractionBasis
from tl_degen.compare import (
    PatchCurve,
    default_grid,
    edge_mass_counts,
    fraction_of_effect,
    needed_directions,
)
from tl_degen.toy import modadd

SITE = "resid_mid.0:last"
FIT_SITES = ["resid_pre.0", SITE, "resid_post.0:last", "logits:last"]


@pytest.fixture(scope="module")
def toy():
    """The shipped model (float64), LIB/PCA/neuron bases, 80 pairs, a comparison."""
    model = modadd.load_bridge(dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1200])
    bases = {m: tl_degen.fit_bases(model, tokens, FIT_SITES, method=m, batch_size=1200,
                                   progress=False) for m in ("lib", "pca", "neuron")}
    clean, corrupted, ld = modadd.patching_pairs(80, seed=3)
    cmp = tl_degen.compare_bases(model, clean, corrupted, ld, [SITE], bases=bases,
                                 n=[1, 3, 10, 30], n_bootstrap=200, progress=False)
    return model, bases, clean, corrupted, ld, cmp


# ---------------------------------------------------------------------------- plain math
def test_default_grid():
    assert default_grid(5) == [1, 2, 3, 4, 5]
    g = default_grid(576)
    assert g[0] == 1 and g[-1] == 576 and g == sorted(set(g)) and 14 <= len(g) <= 17
    with pytest.raises(tl_degen.TLDegenError):
        default_grid(0)


def test_fraction_and_needed_on_a_hand_built_curve():
    # two pairs; base 0 and 2, whole site 10 and 12: effect 10 each
    per = torch.tensor([[1.0, 3.0], [5.0, 7.0], [9.0, 11.0], [10.0, 12.0]])
    base, full = torch.tensor([0.0, 2.0]), torch.tensor([10.0, 12.0])
    fr = fraction_of_effect(per, base, full)[0]
    assert torch.allclose(fr, torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    n = [1, 2, 4, 8]
    assert needed_directions(fr, n, 0.5) == 2 and needed_directions(fr, n, 0.9) == 4
    assert needed_directions(fr, n, 0.95) == 8
    assert math.isinf(float(needed_directions(fr - 0.5, n, 0.9)))  # never reached
    # weights count resampled pairs: pair 0 twice is pair 0's own curve
    only0 = fraction_of_effect(per, base, full, torch.tensor([[2.0, 0.0]]))[0]
    assert torch.allclose(only0, per[:, 0].double() / 10)


def test_edge_mass_counts_on_a_hand_built_matrix():
    E = torch.tensor([[50.0, 0.0, 5.0], [30.0, 10.0, 5.0]])  # total 100
    assert edge_mass_counts(E, (0.5, 0.8, 0.9, 0.95, 1.0)) == {0.5: 1, 0.8: 2, 0.9: 3,
                                                                0.95: 4, 1.0: 5}
    assert edge_mass_counts(torch.zeros(2, 2)) == {0.9: 0, 0.99: 0}


def test_bootstrap_interval_covers_the_truth_on_synthetic_data():
    """A population whose mean fraction curve is known: the percentile band of the mean
    covers the true value in about 95 % of samples, and the full-data value lies in every
    interval of the needed count."""
    n = [1, 2, 4, 8, 16]
    true = torch.tensor([0.2, 0.45, 0.7, 0.92, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    covered = 0
    trials = 60
    for t in range(trials):
        batch = 64
        base = torch.randn(batch, generator=g, dtype=torch.float64)
        effect = 5.0 + torch.randn(batch, generator=g, dtype=torch.float64)
        noise = 0.5 * torch.randn(len(n), batch, generator=g, dtype=torch.float64)
        # per-example curves whose population means give `true` exactly (effect × fraction)
        per = base + true[:, None] * effect + noise * effect.mean()
        per[-1] = base + effect  # n = k: the whole site
        curve = PatchCurve(n, list(range(16)), per, base, base + effect)
        lo, hi = curve.band(n_bootstrap=400, seed=t)
        covered += int(lo[2] <= true[2] <= hi[2])
        need = curve.needed(0.9, n_bootstrap=400, seed=t)
        assert need.n is not None and need.low <= need.n <= need.high
    assert covered >= 0.85 * trials  # ~95 % nominal; 60 trials


# ---------------------------------------------------------------------------- the verb
def test_curves_end_at_the_whole_site_and_match_patch_directions(toy):
    model, bases, clean, corrupted, ld, cmp = toy
    for method in ("lib", "pca", "neuron"):
        basis = bases[method][SITE]
        for mode in ("denoising", "noising"):
            c = cmp.curve(SITE, method, mode, "attribution")
            assert c.n[-1] == basis.k and c.n[:-1] == [v for v in [1, 3, 10, 30] if v < basis.k]
            ref = tl_degen.patch_directions(model, clean, corrupted, bases[method], SITE, ld,
                                            directions=[c.order[:v] for v in c.n], mode=mode,
                                            progress=False)
            assert torch.allclose(c.per_example, ref.per_example, rtol=0, atol=1e-9)
            frac = c.fraction()
            gap = ref.site_value - ref.base
            assert abs(float(frac[-1]) - (ref.all_value - ref.base) / gap) < 1e-9
            if basis.dropped.total == 0:  # a complete basis: n = k is the whole site
                assert abs(float(frac[-1]) - 1.0) < 1e-9
            else:
                assert abs(float(frac[-1]) - 1.0) < 1e-3
    # the neuron basis of a residual site is complete
    assert bases["neuron"][SITE].dropped.total == 0
    # independent: the unpatched runs are plain forward passes, and patching the whole of
    # resid_mid.0:last (a cut of the last position's logits) restores the clean run
    with torch.no_grad():
        plain_clean, plain_corrupted = ld(model(clean)), ld(model(corrupted))
    c = cmp.curve(SITE, "lib", "denoising")
    assert torch.allclose(c.base, plain_corrupted.double(), atol=1e-9)
    assert torch.allclose(c.full, plain_clean.double(), atol=1e-9)
    c = cmp.curve(SITE, "lib", "noising")
    assert torch.allclose(c.base, plain_clean.double(), atol=1e-9)
    assert torch.allclose(c.full, plain_corrupted.double(), atol=1e-9)
    # a fraction of exactly 1 is reached by the complete basis at n = k
    assert cmp.curve(SITE, "neuron").needed(1.0, n_bootstrap=20).n == bases["neuron"][SITE].k


@pytest.mark.parametrize("mode", ["denoising", "noising"])
def test_attribution_order_sorts_by_attribution(toy, mode):
    """One gradient per site and mode serves every basis: each basis' order sorts
    attribution_patch's own per-direction attribution."""
    model, bases, clean, corrupted, ld, cmp = toy
    for b in ("lib", "pca", "neuron"):
        attr = tl_degen.attribution_patch(model, clean, corrupted, bases[b], SITE, ld,
                                          mode=mode, progress=False)
        a = attr.per_direction(SITE).abs()
        order = cmp.curve(SITE, b, mode, "attribution").order
        assert sorted(order) == list(range(bases[b][SITE].k))
        assert (a[order][:-1] >= a[order][1:] - 1e-12 * a.max()).all()
        assert cmp.curve(SITE, b, mode, "basis").order == list(range(len(order)))


def test_a_permuted_basis_gives_identical_curves(toy):
    model, bases, clean, corrupted, ld, _ = toy
    b = bases["lib"][SITE]
    perm = torch.randperm(b.k, generator=torch.Generator().manual_seed(0))
    permuted = InteractionBasis(b.site, "lib", b.C[:, perm], b.C_pinv[perm], b.eigenvalues[perm],
                                b.mean, b.gram, b.gram_eigenvalues, b.dropped, b.center,
                                b.n_samples, b.lambda_all)
    cmp = tl_degen.compare_bases(model, clean, corrupted, ld, [SITE],
                                 bases={"lib": bases["lib"], "shuffled": permuted},
                                 n=[1, 2, 5, 20], modes=["denoising"], ablation=False,
                                 n_bootstrap=50, progress=False)
    one, two = (cmp.curve(SITE, name) for name in ("lib", "shuffled"))
    assert torch.allclose(one.per_example, two.per_example, rtol=0, atol=1e-9)
    assert [int(perm[j]) for j in two.order] == one.order
    # the basis' own column order is a different curve for the shuffled one
    assert not torch.allclose(cmp.curve(SITE, "lib", order="basis").per_example,
                              cmp.curve(SITE, "shuffled", order="basis").per_example)


def test_ablation_curves_and_edges(toy):
    model, bases, clean, corrupted, ld, cmp = toy
    for method in ("lib", "pca"):
        curve = cmp.ablation[SITE][method]
        ref = tl_degen.ablation_curve(model, clean, bases[method], SITE, ld,
                                      n_kept=curve.n_kept, batch_size=len(clean), progress=False)
        assert curve.values == pytest.approx(ref.values, abs=1e-9)
        assert curve.n_kept[0] == 0 and curve.n_kept[-1] == bases[method][SITE].k
    # edges of a given graph: mass counts of its layer pairs
    graph = tl_degen.interaction_graph(model, modadd.tokens_for(modadd.train_test_split()[0][:300]),
                                       bases["lib"], progress=False)
    small = tl_degen.compare_bases(model, clean, corrupted, ld, [SITE], bases={
        "lib": bases["lib"]}, graphs={"lib": graph}, n=[4], modes=["denoising"],
        orders=["basis"], ablation=False, n_bootstrap=20, progress=False)
    pair = f"{SITE}->resid_post.0:last"
    e = small.edges["lib"][pair]
    assert e == {"n_edges": graph.edges[(graph.pairs()[1])].numel(), "required": None,
                 **{f"mass_{int(f * 100)}": v for f, v in
                    edge_mass_counts(graph.edge(SITE, "resid_post.0:last"), (0.9, 0.99)).items()}}
    assert e["mass_90"] <= e["mass_99"] <= e["n_edges"]
    assert "90% of mass in" in small.table()
    # graphs fitted here, with the fewest edges that keep the metric (edge_ablation's bisection)
    fitted = tl_degen.compare_bases(model, clean, corrupted, ld, [SITE, "resid_post.0:last"],
                                    bases={"lib": bases["lib"]}, graphs=True, edge_tolerance=0.5,
                                    n=[4], modes=["denoising"], orders=["basis"],
                                    ablation=False, n_bootstrap=20, progress=False)
    e = fitted.edges["lib"][pair]
    ref = tl_degen.edge_ablation(model, clean, tl_degen.interaction_graph(
        model, torch.cat([clean, corrupted]), bases["lib"], progress=False), ld,
        pairs=[(SITE, "resid_post.0:last")], tolerance=0.5, batch_size=len(clean),
        progress=False)
    assert e["required"] == ref.n_edges_required[pair] and 0 < e["required"] <= e["n_edges"]


def test_round_trip_table_and_figure(toy, tmp_path):
    *_, cmp = toy
    again = tl_degen.BasisComparison.load(cmp.save(tmp_path / "c.safetensors"))
    assert again.table() == cmp.table() and again.sites == cmp.sites
    assert torch.equal(again.curve(SITE, "pca").per_example, cmp.curve(SITE, "pca").per_example)
    text = json.dumps(cmp.as_dict())
    assert tl_degen.BasisComparison.from_dict(json.loads(text)).table() == cmp.table()
    need = cmp.needed(SITE, "neuron", 0.9)
    assert need.n is not None and need.low <= need.n <= need.high
    assert f"{SITE}  neuron" in repr(cmp) and "90%" in repr(cmp)
    fig = cmp.figure()
    assert len(fig.axes) == 2 and len(fig.axes[0].collections) == 3  # one band per basis
    cmp.plot(SITE, "noising").save(tmp_path / "n.png")
    cmp.plot(SITE, kind="ablation").save(tmp_path / "a.svg")
    assert (tmp_path / "n.png").stat().st_size > 5000


def test_a_single_site_basis_among_several_sites(toy):
    """A user's basis of one site (e.g. from an SAE decoder) beside full sets: compared at its
    site only, node ablation included."""
    model, bases, clean, corrupted, ld, _ = toy
    other = "resid_post.0:last"
    cmp = tl_degen.compare_bases(model, clean, corrupted, ld, [SITE, other],
                                 bases={"pca": bases["pca"], "mine": bases["neuron"][SITE]},
                                 n=[4], modes=["denoising"], orders=["basis"],
                                 n_bootstrap=20, progress=False)
    assert set(cmp.patching[SITE]) == {"pca", "mine"} and set(cmp.patching[other]) == {"pca"}
    assert set(cmp.ablation[SITE]) == {"pca", "mine"} and set(cmp.ablation[other]) == {"pca"}
    assert "resid_post.0:last  pca" in cmp.table()


def test_one_dataset_with_labels():
    """Resample patching: each prompt paired with the next, accuracy on the clean labels."""
    model = modadd.load_bridge(dtype=torch.float64)
    pairs = modadd.train_test_split()[1][:60]
    tokens, labels = modadd.tokens_for(pairs), modadd.labels_for(pairs)
    bases = tl_degen.fit_bases(model, modadd.tokens_for(modadd.train_test_split()[0][:600]),
                               FIT_SITES, method="neuron", progress=False)
    cmp = tl_degen.compare_bases(model, tokens, None, "accuracy", [SITE], bases={"n": bases},
                                 labels=labels, n=[8], modes=["denoising"], ablation=False,
                                 n_bootstrap=20, progress=False)
    assert cmp.clean == pytest.approx(1.0) and cmp.corrupted < 0.1  # the next prompt's answer
    assert float(cmp.curve(SITE, "n").fraction()[-1]) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("change, error, phrase", [
    ({"sites": ["logits"]}, tl_degen.SiteError, "logits are the output"),
    ({"sites": ["mlp_post.0:last"]}, tl_degen.BasisMismatchError, "has no basis at"),
    ({"metric": lambda logits: logits[:, -1, :3]}, tl_degen.TLDegenError, "scalar tensor or one"),
    ({"metric": "accuracy"}, tl_degen.TLDegenError, "needs labels"),
    ({"bases": {"x": "not a basis"}}, tl_degen.TLDegenError, "must be a BasisSet"),
    ({"orders": ["lambda"]}, tl_degen.TLDegenError, "orders must be among"),
    ({"modes": ["both"]}, tl_degen.TLDegenError, "mode must be"),
    ({"n": [0, 4]}, tl_degen.TLDegenError, "n must be positive"),
    ({"fractions": [1.5]}, tl_degen.TLDegenError, "fractions must be numbers"),
    ({"n_bootstrap": True}, tl_degen.TLDegenError, "n_bootstrap must be"),
    ({"metric": lambda logits: logits[:, -1, 0].mean()}, tl_degen.DataError, "not a scalar"),
    ({"n": [2.5]}, tl_degen.TLDegenError, "n must be positive"),
    ({"graphs": {"lib": "g"}}, tl_degen.TLDegenError, "must be an InteractionGraph"),
    ({"edge_tolerance": float("nan"), "graphs": True}, tl_degen.TLDegenError,
     "edge_tolerance must be a positive finite"),
    ({"edge_tolerance": 0.1}, tl_degen.TLDegenError, "edge_tolerance needs graphs"),
    ({"corrupted": "same"}, tl_degen.DataError, "does not change the metric"),
])
def test_bad_inputs(toy, change, error, phrase):
    model, bases, clean, corrupted, ld, _ = toy
    args = {"sites": [SITE], "metric": ld, "bases": {"lib": bases["lib"]}, "corrupted": corrupted}
    args.update(change)
    if isinstance(args["corrupted"], str):
        args["corrupted"] = clean
    with pytest.raises(error, match=phrase):
        tl_degen.compare_bases(model, clean, args["corrupted"], args["metric"], args["sites"],
                               bases=args["bases"], n=change.get("n", [2]),
                               orders=change.get("orders", ["basis"]),
                               modes=change.get("modes", ["denoising"]),
                               fractions=change.get("fractions", (0.5,)),
                               n_bootstrap=change.get("n_bootstrap", 20), ablation=False,
                               graphs=change.get("graphs"),
                               edge_tolerance=change.get("edge_tolerance"), progress=False)


def test_bases_of_another_model_are_refused(toy, tokenizer_dir):
    model, bases, clean, corrupted, ld, _ = toy
    other = modadd.load_bridge(dtype=torch.float64)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() == 2).mul_(1.5)
    with pytest.raises(tl_degen.BasisMismatchError, match="basis 'lib'.*different weights"):
        tl_degen.compare_bases(other, clean, corrupted, ld, [SITE], bases={"lib": bases["lib"]},
                               progress=False)
    arch = M.build("gpt2", tokenizer_dir)
    with pytest.raises(tl_degen.BasisMismatchError):
        tl_degen.compare_bases(arch, M.random_tokens(), M.random_tokens(seed=2),
                               lambda lg: lg[:, -1, 0], [SITE], bases={"lib": bases["lib"]},
                               progress=False)


def test_every_architecture(model, arch):
    """On every backend (a HookedTransformer resumes at the site's block): the neuron basis of
    an all-position residual site is complete, so its curve ends at the whole-site patch, and
    each point equals patch_directions with the same directions."""
    model = model.double()
    clean, corrupted = M.random_tokens(10, 6, seed=1), M.random_tokens(10, 6, seed=2)
    site = M.mid_sites(arch)[0]

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 5]

    bases = tl_degen.fit_bases(model, torch.cat([clean, corrupted]), [site], method="neuron",
                               progress=False)
    cmp = tl_degen.compare_bases(model, clean, corrupted, metric, [site], bases={"n": bases},
                                 modes=["noising"], ablation=False, n_bootstrap=20,
                                 progress=False)
    c = cmp.curve(site, "n")
    assert abs(float(c.fraction()[-1]) - 1.0) < 1e-9
    ref = tl_degen.patch_directions(model, clean, corrupted, bases, site, metric,
                                    directions=[c.order[:v] for v in c.n], mode="noising",
                                    progress=False)
    assert torch.allclose(c.per_example, ref.per_example, rtol=0, atol=1e-9)
