"""A section planned once (tl_degen.sections.plan): its closed form recognised once per prompt
length, every site read in one forward pass per batch, and its implementations agreeing."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tl_degen.adapters import get_adapter
from tl_degen.sections import plan as section_plan
from tl_degen.sections import recognise as recognition
from tl_degen.sections.mlp import MLPSection
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.recognise import CHECK_ROWS
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]

pytestmark = pytest.mark.filterwarnings("ignore::tl_degen.AmbiguousRankWarning")


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_one_recognition_per_section_and_length_and_one_forward_per_batch(monkeypatch):
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    pairs = modadd.all_pairs()[::29]
    prompts = [row for row in modadd.tokens_for(pairs[:300])] + [
        row[1:] for row in modadd.tokens_for(pairs[300:])]  # lengths 3 and 2
    recognised = _counting(monkeypatch, section_plan, "recognise")
    reads = _counting(monkeypatch, type(get_adapter(model)), "read_sites")
    sites = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last"]
    bases = tl_degen.fit_bases(model, prompts, sites, batch_size=60, progress=False)
    n_long, n_short = 5, -(-(len(pairs) - 300) // 60)
    # 3 sections (the last site's is into the logits) × 2 lengths
    assert len(recognised) == 3 * 2
    # a TransformerLens 3.x bridge cannot pattern-weight b_O through hooks: no closed form
    # for attention, so every site comes from the model's pass
    formulas = get_adapter(model).pattern_before_output
    # the model probe (one sequence); per length, every site and the logits after the last
    # on the checked rows (the section into the logits is recognised in that pass), then
    # pass 1: the first site of each batch from the model and the others by formula (or
    # every site from the model's pass); the Jacobian passes read nothing again
    per_batch = 1 if formulas else 3
    assert [len(a[2]) for a in reads] == ([1] + [4] + [per_batch] * n_long + [4]
                                         + [per_batch] * n_short)
    assert reads[1][1].shape[0] == min(60, CHECK_ROWS)  # the check reads the checked rows
    recognised.clear()
    reads.clear()
    graph = tl_degen.interaction_graph(model, prompts, bases, batch_size=60, progress=False)
    assert len(recognised) == 2 * 2
    # the model check; per length, both input sites and resid_post.0:last after them on the
    # checked rows (the section into it is recognised in that pass), then the first site of
    # each batch (both from the model without the attention formula)
    per_batch = 1 if formulas else 2
    assert [len(a[2]) for a in reads] == ([1] + [3] + [per_batch] * n_long + [3]
                                         + [per_batch] * n_short)
    routes = graph.config["edge_routes"]
    assert routes["resid_mid.0:last->resid_post.0:last"] == "closed form"
    attention = "closed form" if formulas else "backward"
    assert routes["resid_pre.0->resid_mid.0:last"] == attention


def test_plan_implementations_agree():
    """The same batch through a plan with and without its closed form: equal Grams and edges
    (the closed form against exact batched autograd), and the plan says what it used."""
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.all_pairs()[::61])
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for a, b in zip(bases.sites, list(bases.sites)[1:]):
        (x,) = adapter.read_sites(tokens, [a])
        out_C = None if b.kind == "logits" else bases[b].C
        h = x @ bases[a].C
        x_proj = h @ bases[a].C_pinv
        results = {}
        for use in (True, False):
            plan = SectionPlan(adapter, a, b, alphas=[1.0], weights=[1.0], closed_form=use)
            acc = GramAccumulator(x.shape[-1])
            assert plan.add_jacobian_gram(tokens, x, out_C, acc) is None  # exact, no probes
            E = plan.edge_squares(tokens, x, x_proj, h, bases[a].C_pinv, out_C)
            results[use] = (acc.value, E, plan.routes)
        (G1, E1, r1), (G0, E0, r0) = results[True], results[False]
        # a TransformerLens 3.x bridge cannot pattern-weight b_O: attention has no closed form
        closed = a.kind != "resid_pre" or adapter.pattern_before_output
        assert r1 == ({"closed form"} if closed else {"backward"}) and "closed form" not in r0
        assert float((G1 - G0).abs().max() / G0.abs().max()) < 1e-10, (a, b)
        assert float((E1 - E0).abs().max() / E0.abs().max()) < 1e-10, (a, b)
        assert repr(plan).startswith(f"SectionPlan({a.name} → {b.name}; used: ")


def test_recognise_with_the_output_given_equals_reading_it():
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    adapter = get_adapter(model)
    tokens = modadd.tokens_for(modadd.all_pairs()[::53])
    a, b = Site.parse("resid_mid.0:last"), Site.parse("resid_post.0:last")
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = adapter.read_sites(tokens, [a, b])
    assert isinstance(recognition.recognise(adapter, tokens, a, b, x, y), MLPSection)
    assert isinstance(recognition.recognise(adapter, tokens, a, b, x), MLPSection)
    # an output that is not the section's: not recognised
    assert recognition.recognise(adapter, tokens, a, b, x, y + 1e-3) is None
