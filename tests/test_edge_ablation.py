"""Edge ablation: reference agreement (DESIGN.md §5) and exact cases."""

from __future__ import annotations

import json

import pytest
import torch

import tl_degen
from tl_degen import TLDegenError
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
REF_KEYS = ["ln1.0", "ln2.0", "unembed"]


@pytest.mark.slow
def test_edges_required_match_reference(reference_dir):
    """Bisection with tolerance 0.001 on the 8939 held-out pairs: the number of edges each
    layer pair needs is within 10% of the reference, and LIB needs fewer edges than PCA."""
    model = modadd.load_bridge(modadd.load_state_dict(reference_dir / "model.safetensors"))
    train, test = modadd.train_test_split()
    tokens = modadd.tokens_for(train)
    totals = {}
    for method in ("lib", "pca"):
        bases = tl_degen.fit_bases(model, tokens, SITES, method=method, batch_size=4000,
                                   threshold=tl_degen.Threshold.absolute(1e-15),
                                   progress=False)
        graph = tl_degen.interaction_graph(model, tokens, bases, batch_size=4000,
                                           progress=False)
        # the reference bisects over [0, d_out · d_in] of the sites (constant included)
        upper = {f"{a.name}->{b.name}": bases[a].d_site * bases[b].d_site
                 for a, b in graph.pairs()}
        result = tl_degen.edge_ablation(model, modadd.tokens_for(test), graph, "accuracy",
                                        labels=modadd.labels_for(test), tolerance=0.001,
                                        upper=upper, progress=False)
        ref = json.loads((reference_dir / f"{method}_edge_ablation.json").read_text())
        assert result.baseline == pytest.approx(ref["no_ablation_result"], abs=1e-9)
        for key, ref_key in zip(result.n_edges_required, REF_KEYS):
            ours, theirs = result.n_edges_required[key], ref["n_edges_required"][ref_key]
            assert abs(ours - theirs) <= 0.1 * theirs, (method, key, ours, theirs)
        totals[method] = sum(result.n_edges_required.values())
    assert totals["lib"] < totals["pca"]


@pytest.fixture(scope="module")
def small():
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    train, test = modadd.train_test_split()
    tokens = modadd.tokens_for(train[:600])
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    return model, graph, modadd.tokens_for(test[:500]), modadd.labels_for(test[:500])


def test_all_edges_reproduce_the_model_and_none_destroy_it(small):
    model, graph, tokens, labels = small
    key = "resid_mid.0:last->resid_post.0:last"
    a, b = graph.pairs()[1]
    total = int((graph.edges[(a, b)][:, 1:] >= 0).sum())
    result = tl_degen.edge_ablation(model, tokens, graph, "loss", labels=labels,
                                    pairs=[(a, b)], n_edges=[total, 0], progress=False)
    full, none = result.results[key][total], result.results[key][0]
    assert full == pytest.approx(result.baseline, rel=1e-5)
    assert none > 10 * result.baseline  # only the constant node's edges left
    assert "EdgeAblationResult" in repr(result)


def test_bisection_finds_the_smallest_passing_count(small):
    model, graph, tokens, labels = small
    pair = graph.pairs()[2]
    key = f"{pair[0].name}->{pair[1].name}"
    result = tl_degen.edge_ablation(model, tokens, graph, "accuracy", labels=labels,
                                    pairs=[pair], tolerance=0.01, progress=False)
    k = result.n_edges_required[key]
    probed = result.results[key]
    assert abs(probed[k] - result.baseline) <= 0.01
    failing = [n for n, v in probed.items() if abs(v - result.baseline) > 0.01]
    assert failing and max(n for n in failing if n < k) == k - 1


def test_edge_ablation_bad_input(small):
    model, graph, tokens, labels = small
    with pytest.raises(TLDegenError, match="n_edges"):
        tl_degen.edge_ablation(model, tokens, graph, "accuracy", labels=labels)
    with pytest.raises(TLDegenError, match="not a layer pair"):
        tl_degen.edge_ablation(model, tokens, graph, "accuracy", labels=labels,
                               pairs=[("resid_pre.0", "resid_post.0:last")], n_edges=[1])


def test_neuron_graph_keeps_its_constant_column(small):
    """Neuron bases carry the constant as their last column: keeping every other edge
    reproduces the model, keeping none leaves only the biases (not the first neuron)."""
    model, _, tokens, labels = small
    train = modadd.train_test_split()[0]
    sites = ["resid_mid.0:last", "resid_post.0:last", "logits:last"]
    bases = tl_degen.fit_bases(model, modadd.tokens_for(train[:300]), sites, method="neuron",
                               progress=False)
    graph = tl_degen.interaction_graph(model, modadd.tokens_for(train[:300]), bases,
                                       progress=False)
    a, b = graph.pairs()[0]
    assert graph.constant_node(a) == bases[a].k - 1
    total = bases[a].k - 1  # every non-constant column …
    total *= bases[b].k  # … into every target
    key = f"{a.name}->{b.name}"
    result = tl_degen.edge_ablation(model, tokens, graph, "loss", labels=labels,
                                    pairs=[(a, b)], n_edges=[total, 0], progress=False)
    assert result.results[key][total] == pytest.approx(result.baseline, rel=1e-5)
    assert result.results[key][0] > 10 * result.baseline
