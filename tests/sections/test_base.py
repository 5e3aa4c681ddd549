"""Every implementation of the Section interface computes the same section (DESIGN.md §4
steps 4 and 8): table-driven over architectures × routes × integration rules.

For each pair of consecutive sites of ``tests/models.py``'s chain, the model differentiated by
autograd (:class:`ModelSection`, backward mode) is the reference; forward-mode edges, the
recognised closed form or formula (where the section has one) and the probed estimate must
agree with it, through the interface alone (no verb in between).
"""

from __future__ import annotations

import pytest
import torch

from tests import models as M
from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections import ModelSection, ProbedSection, SectionPlan, integration_rule
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator

# rotary embeddings (and Llama's RMSNorm) run in float32 inside the Hugging Face Llama/NeoX
# models
TOL = {"llama": 1e-6, "neox": 1e-6}
RULES = [("gradient", None), ("trapezoid", 3)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _pairs(arch):
    sites = [Site.parse(s) for s in M.mid_sites(arch)]
    return list(zip(sites, sites[1:]))


def _gram(section, x, C, rule, tokens):
    acc = GramAccumulator(x.shape[-1])
    out = section.add_jacobian_gram(x, C, acc, rule.alphas, rule.weights, tokens)
    assert out is None
    return acc.value * acc.count


@pytest.mark.parametrize("rule_name,n_alpha", RULES)
def test_every_route_computes_the_same_section(arch, model, rule_name, n_alpha):
    rule = integration_rule(rule_name, n_alpha)
    adapter = get_adapter(model)
    tokens = M.random_tokens(6, 5)
    tol = TOL.get(arch, 1e-10)
    gen = torch.Generator().manual_seed(0)
    checked_closed = 0
    with prepared(model, torch.float64):
        for a, b in _pairs(arch):
            x, y = adapter.read_sites(tokens, [a, b])
            reference = ModelSection(adapter, a, b, tokens.shape[1])
            # the forward pass is the model's read of the output site
            torch.testing.assert_close(reference.forward(x, tokens), y, rtol=0, atol=1e-12)
            C_out = torch.randn(y.shape[-1], 3, generator=gen, dtype=torch.float64)
            C_in = torch.randn(x.shape[-1], 4, generator=gen, dtype=torch.float64)
            C_pinv = torch.linalg.pinv(C_in)
            h = x @ C_in
            x_proj = h @ C_pinv
            gram = _gram(reference, x, C_out, rule, tokens)
            edges = {r: reference.edge_squares(x_proj, h, C_pinv, C_out, rule.alphas,
                                               rule.weights, tokens, route=r)
                     for r in ("forward", "backward")}
            assert _rel(edges["forward"], edges["backward"]) < tol, (a, b)
            assert edges["backward"].shape == (3, 4) and bool(edges["backward"].gt(0).any())
            # the recognised section (closed form or formula), where there is one
            closed = SectionPlan(adapter, a, b, alphas=rule.alphas,
                                 weights=rule.weights).closed(tokens, x, y)
            if closed is None:
                continue
            checked_closed += 1
            out = closed.forward(x, tokens)
            if out is not None:  # (Llama's norms round to float32: its tolerance)
                assert _rel(out, y) < tol, (a, b, closed)
            assert _rel(_gram(closed, x, C_out, rule, tokens), gram) < tol, (a, b, closed)
            got = closed.edge_squares(x_proj, h, C_pinv, C_out, rule.alphas, rule.weights,
                                      tokens)
            assert _rel(got, edges["backward"]) < tol, (a, b, closed)
            # pullbacks summed over directions: the same vector-Jacobian products
            totals = []
            for source in (closed, reference):
                total = torch.zeros_like(x)
                for pb in source.pullbacks(x, C_out, rule.alphas, rule.weights, tokens):
                    total[pb.samples][:, pb.in_rows] += pb.g.sum(-1)
                totals.append(total)
            assert _rel(*totals) < tol, (a, b, closed)
    # the no-norm ReLU model has a closed form for every pair (attention only where the
    # backend computes the pattern before the output, as TransformerLens 4 does)
    if arch == "native_relu":
        assert checked_closed == sum(1 for a, _ in _pairs(arch) if a.kind != "resid_pre"
                                     or adapter.pattern_before_output)


def test_probed_sections_estimate_within_their_error():
    """ProbedSection on the exact section: the estimate's actual error is within a few of its
    reported standard errors, for the Gram and the edges."""
    model = M.build("native_ln_gelu")
    adapter = get_adapter(model)
    tokens = M.random_tokens(8, 5)
    a, b = Site.parse("resid_pre.1"), Site.parse("resid_mid.1")
    gen = torch.Generator().manual_seed(3)
    with prepared(model, torch.float64):
        (x,) = adapter.read_sites(tokens, [a])
        exact = ModelSection(adapter, a, b, tokens.shape[1])
        probed = ProbedSection(exact, n_probes=256, n_groups=8,
                               generator=torch.Generator().manual_seed(0))
        C_out = torch.randn(17, 6, generator=gen, dtype=torch.float64)
        C_in = torch.randn(17, 5, generator=gen, dtype=torch.float64)
        h = x @ C_in
        C_pinv = torch.linalg.pinv(C_in)
        gram = _gram(exact, x, C_out, integration_rule("gradient"), tokens)
        est = probed.add_jacobian_gram(x, C_out, GramAccumulator(17), [1.0], [1.0], tokens)
        actual = float((est.value - gram).norm() / gram.norm())
        assert 0 < actual <= 4 * est.relative_error < 0.5
        E = exact.edge_squares(h @ C_pinv, h, C_pinv, C_out, [1.0], [1.0], tokens)
        est_E = probed.edge_squares(h @ C_pinv, h, C_pinv, C_out, [1.0], [1.0], tokens)
        actual = float((est_E.value - E).norm() / E.norm())
        assert 0 < actual <= 4 * est_E.relative_error < 0.5
