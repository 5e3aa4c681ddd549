"""Stochastic (Hutchinson) estimates converge to the exact values, and their reported error
covers the actual error (DESIGN.md §4 step 9)."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.adapters import get_adapter
from tl_degen.fitting import prepared
from tl_degen.sections import ModelSection
from tl_degen.sections.plan import accumulate_jacobian_gram
from tl_degen.sections.probes import estimate_jacobian_gram
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.toy import modadd


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model = M.build("gpt2", M.save_word_tokenizer(tmp_path_factory.mktemp("tok")))
    return model, M.random_tokens(16, 6)


def test_jacobian_gram_estimate_converges_and_error_covers(setting):
    model, tokens = setting
    adapter = get_adapter(model)
    pre, mid = Site.parse("resid_pre.1"), Site.parse("resid_mid.1")
    C = torch.randn(17, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with prepared(model, torch.float64):
        (x,) = adapter.read_sites(tokens, [pre])
        exact = GramAccumulator(17)
        accumulate_jacobian_gram(adapter, tokens, pre, mid, x, C, exact, alphas=[1.0],
                                 weights=[1.0], closed_form=False)
        exact_sum = exact.value * exact.count
        errors = []
        for n_probes in (8, 64, 512):
            run = ModelSection(adapter, pre, mid, tokens.shape[1]).run(tokens)
            est = estimate_jacobian_gram(run, x, C, alphas=[1.0], weights=[1.0],
                                         n_probes=n_probes, n_groups=8,
                                         generator=torch.Generator().manual_seed(n_probes),
                                         n_tokens=tokens.numel())
            actual = float((est.value - exact_sum).norm() / exact_sum.norm())
            assert actual <= 4 * est.relative_error, (n_probes, actual, est.relative_error)
            errors.append(actual)
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < errors[0] / 4  # ~1/sqrt(n_probes): 8x fewer → ~2.8x per step


def test_fit_and_graph_with_probes(setting):
    model, tokens = setting
    sites = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "logits:last"]
    exact = tl_degen.fit_bases(model, tokens, sites, progress=False)
    approx = tl_degen.fit_bases(model, tokens, sites, n_probes=16, probe_groups=8,
                                target_error=0.01, progress=False)
    errs = [approx[s].jacobian_gram_error for s in sites[:3]]
    # resid_mid.1 → resid_post.1:last: ln2 and the MLP in closed form, exact;
    # resid_post.1:last → logits:last: the final LayerNorm and the unembedding in closed
    # form, exact; resid_pre.1 is probed in rounds of 16 until within 1 %
    assert errs[1] == 0.0 and errs[2] == 0.0 and 0 < errs[0] <= 0.01, errs
    spent = approx.config["probes_per_batch"]
    assert set(spent) == {"resid_pre.1"}, spent
    assert all(v % 16 == 0 and 16 <= v <= 256 for v in spent.values()), spent
    assert max(spent.values()) > 16, spent  # some site needed more than one round
    for i, s in enumerate(sites[:2]):
        # a site's Λ carry its own estimate's error and, through the next site's estimated
        # basis, the error of every estimate downstream
        lam, lam2 = exact[s].eigenvalues[:4], approx[s].eigenvalues[:4]
        assert ((lam2 - lam).abs() / lam).max() < 5 * sum(errs[i:]) + 1e-12
    assert "stochastic M′" in repr(approx)
    g_exact = tl_degen.interaction_graph(model, tokens, exact, progress=False)
    g_est = tl_degen.interaction_graph(model, tokens, exact, n_probes=128, probe_groups=8,
                                       route="probes", progress=False)
    # the attention pair (after GPT-2's LayerNorm) probes through the section's formula; the
    # MLP after ln2 and the unembedding have closed-form edges, never probed
    assert set(g_est.config["edge_routes"].values()) == {"probes (section formula)",
                                                         "closed form"}
    for pair in g_exact.pairs():
        E, F = g_exact.edges[pair], g_est.edges[pair]
        actual = float((F - E).norm() / E.norm())
        assert actual <= 4 * g_est.errors[pair] + 1e-12, (pair, actual, g_est.errors[pair])


def test_closed_form_sections_stay_exact():
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.all_pairs()[::211])
    sites = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
    a = tl_degen.fit_bases(model, tokens, sites, progress=False)
    b = tl_degen.fit_bases(model, tokens, sites, n_probes=8, progress=False)
    if not get_adapter(model).pattern_before_output:  # TransformerLens 3.x bridge: the
        sites = sites[1:]  # attention section has no closed form there, so it is estimated
    for s in sites[:-1]:
        assert b[s].jacobian_gram_error == 0.0
        torch.testing.assert_close(a[s].eigenvalues, b[s].eigenvalues)


def test_bad_probe_settings(setting):
    model, tokens = setting
    with pytest.raises(tl_degen.TLDegenError, match="probe groups"):
        tl_degen.fit_bases(model, tokens, ["resid_pre.1", "resid_mid.1"], n_probes=3,
                           probe_groups=4, progress=False)


def test_target_error_out_of_reach_says_what_it_would_cost(setting):
    model, tokens = setting
    sites = ["resid_pre.1", "resid_mid.1"]
    with pytest.warns(tl_degen.ProbeErrorWarning, match=r"about \d+ probes would meet it"):
        b = tl_degen.fit_bases(model, tokens, sites, n_probes=4, probe_groups=4,
                               target_error=1e-4, max_probes=8, progress=False)
    assert b.config["probes_per_batch"]["resid_pre.1"] == 8
    assert b["resid_pre.1"].jacobian_gram_error > 1e-4
    with pytest.raises(tl_degen.TLDegenError, match="needs n_probes"):
        tl_degen.fit_bases(model, tokens, sites, target_error=0.05, progress=False)
    with pytest.raises(tl_degen.TLDegenError, match="below n_probes"):
        tl_degen.fit_bases(model, tokens, sites, n_probes=8, max_probes=4, progress=False)
