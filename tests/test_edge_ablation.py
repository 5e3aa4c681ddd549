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


def _brute_force_edge_metric(model, tokens, graph, pair, k, fn):
    """One model run per output direction, from the embedding: the definition, no reuse."""
    from tl_degen.adapters import get_adapter
    from tl_degen.sites import Site

    adapter = get_adapter(model)
    in_site, out_site = pair
    b_in, b_out = graph.bases[in_site], graph.bases[out_site]
    E = graph.edges[pair]
    const = graph.constant_node(in_site)
    cols = [j for j in range(E.shape[1]) if j != const]
    order = E[:, cols].flatten().argsort(descending=True)[:k]
    mask = torch.zeros(E.shape, dtype=torch.bool)
    mask[order // len(cols), torch.tensor(cols)[order % len(cols)]] = True
    if const is not None:
        mask[:, const] = True
    with torch.no_grad():
        (x,) = adapter.read_sites(tokens, [in_site])
        h = x.double() @ b_in.C
        coords = []
        for i in range(E.shape[0]):
            x_i = ((h * mask[i]) @ b_in.C_pinv).to(x.dtype)
            if in_site.has_constant:
                x_i[..., -1] = 1.0
            y = adapter.run(tokens, read=out_site, write=(in_site, x_i)).double()
            coords.append(y @ b_out.C[:, i])
        x_out = (torch.stack(coords, -1) @ b_out.C_pinv).to(x.dtype)
        if out_site.kind == "logits":
            logits = adapter.read_sites(tokens, [Site("logits")])[0].clone()
            logits[:, out_site.resolve_positions(tokens.shape[1])] = x_out
        else:
            x_out[..., -1] = 1.0
            logits = adapter.run(tokens, read=Site("logits"), write=(out_site, x_out))
        return float(fn(logits).mean())


@pytest.mark.parametrize("arch", ["modadd", "native_ln_gelu", "llama"])
def test_reused_and_stacked_runs_equal_one_run_per_direction(arch, tokenizer_dir):
    """Closed-form sections (modadd), stacked model runs (LayerNorm, RMSNorm + rotary) and the
    cache across probes give the metric of one model run per output direction (1e-10)."""
    from tests import models as M

    if arch == "modadd":
        model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
        train, test = modadd.train_test_split()
        fit_tokens, tokens = modadd.tokens_for(train[:300]), modadd.tokens_for(test[:64])
        sites = SITES
    else:
        model = M.build(arch, tokenizer_dir)
        if arch == "llama":  # the closed-form unembedding against the model's own norm
            M.exact_float64(model)
        g = torch.Generator().manual_seed(1)
        fit_tokens = torch.randint(0, M.VOCAB, (48, 5), generator=g)
        tokens = torch.randint(0, M.VOCAB, (16, 5), generator=g)
        sites = ["resid_pre.1", "resid_post.1:last", "logits:last"]
    bases = tl_degen.fit_bases(model, fit_tokens, sites, progress=False)
    graph = tl_degen.interaction_graph(model, fit_tokens, bases, progress=False)
    labels = tokens[:, 0] % 7

    def fn(logits):
        return torch.nn.functional.cross_entropy(logits[:, -1].double(), labels,
                                                 reduction="none")

    for pair in graph.pairs():
        n = int(graph.edges[pair].numel())
        ks = [n // 2, n // 2 + 3, n // 5, 1]  # later probes reuse cached rows
        key = f"{pair[0].name}->{pair[1].name}"
        result = tl_degen.edge_ablation(model, tokens, graph, "loss", labels=labels,
                                        pairs=[pair], n_edges=ks, batch_size=40,
                                        progress=False)
        for k in ks:
            expected = _brute_force_edge_metric(model, tokens, graph, pair, k, fn)
            assert result.results[key][k] == pytest.approx(expected, rel=1e-10, abs=1e-12), (
                arch, key, k)
