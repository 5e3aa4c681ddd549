"""Sections without a closed form: the three autograd routes for edges (forward-mode per
input direction, backward per output direction, random probes) agree, on every architecture
of ``tests/models.py`` (DESIGN.md §4 step 8)."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.sections.autograd import edge_route

# rotary embeddings are computed in float32 inside the Hugging Face Llama/NeoX models,
# whatever the model's dtype, so their Jacobians agree to float32 rounding only
TOL = {"llama": 1e-6, "neox": 1e-6}


def _graphs(model, sites, tokens, **kwargs):
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    return {r: tl_degen.interaction_graph(model, tokens, bases, closed_form=False, route=r,
                                          progress=False, **kwargs)
            for r in ("forward", "backward")}


def test_forward_and_backward_routes_agree(arch, model):
    sites = M.mid_sites(arch)
    graphs = _graphs(model, sites, M.random_tokens(12, 6))
    tol = TOL.get(arch, 1e-10)
    for pair, E in graphs["backward"].edges.items():
        F = graphs["forward"].edges[pair]
        assert E.abs().max() > 0
        assert float((F - E).abs().max() / E.abs().max()) < tol, pair
    routes = graphs["forward"].config["edge_routes"]
    assert set(routes.values()) == {"forward"}, routes


@pytest.mark.filterwarnings("ignore::tl_degen.AmbiguousRankWarning")
def test_routes_agree_with_the_closed_forms_and_integration():
    """The modadd sections all have closed forms: both autograd routes reproduce them, with
    an integrated-gradients rule too (α-weighted tangents)."""
    from tl_degen.toy import modadd

    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.all_pairs()[::97])
    sites = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
             "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    for kw in ({}, {"integration": "gauss-legendre", "n_alpha": 3}):
        ref = tl_degen.interaction_graph(model, tokens, bases, progress=False, **kw)
        for r in ("forward", "backward"):
            g = tl_degen.interaction_graph(model, tokens, bases, closed_form=False, route=r,
                                           progress=False, **kw)
            for pair, E in ref.edges.items():
                err = float((g.edges[pair] - E).abs().max() / E.abs().max())
                assert err < 1e-10, (r, kw, pair, err)


def test_forward_route_in_chunks_and_batches(tokenizer_dir):
    """Chunks of input directions per pass and batches of sequences add up to the same."""
    from tl_degen.adapters import get_adapter
    from tl_degen.sections import ModelSection
    from tl_degen.sections.autograd import forward_chunk, forward_edge_squares

    model = M.build("gpt2", tokenizer_dir)
    tokens = M.random_tokens(10, 6)
    bases = tl_degen.fit_bases(model, tokens, ["resid_pre.1", "resid_mid.1"], progress=False)
    a, b = bases.sites
    adapter = get_adapter(model)
    (x,) = adapter.read_sites(tokens, [a])
    h = x @ bases[a].C
    section = ModelSection(adapter, a, b, tokens.shape[1])
    args = (section.run(tokens), h @ bases[a].C_pinv, h, bases[a].C_pinv, bases[b].C)
    whole = forward_edge_squares(*args, alphas=[1.0], weights=[1.0], chunk=bases[a].k)
    for chunk in (1, 5):
        torch.testing.assert_close(
            forward_edge_squares(*args, alphas=[1.0], weights=[1.0], chunk=chunk), whole,
            rtol=1e-12, atol=0)
    # a tiny memory budget means one direction per pass
    assert forward_chunk(10, 6, 1000, bases[a].k, x.device, budget=1) == 1
    # the section's own edges (the cheapest route, its chunk) in two batches add up
    halves = sum(section.edge_squares((hh @ bases[a].C_pinv), hh, bases[a].C_pinv, bases[b].C,
                                      [1.0], [1.0], t, route="forward")
                 for t, hh in ((tokens[:4], h[:4]), (tokens[4:], h[4:])))
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("k_in,k_out,n_out_pos,n_probes,expected", [
    (562, 562, 12, 32, "forward"),      # tutorial 3: attention, every position
    (769, 49, 1, 32, "backward"),       # into a :last site: one output position
    (50, 50257, 1, None, "forward"),    # into raw logits: never 50257 pullbacks
    (769, 8, 128, 2, "probes"),         # few output directions, many positions, few probes
    (769, 8, 128, None, "forward"),
])
def test_edge_route_takes_the_cheapest(k_in, k_out, n_out_pos, n_probes, expected):
    assert edge_route(k_in, k_out, n_out_pos, n_probes) == expected


def test_route_argument_is_checked(tokenizer_dir):
    model = M.build("gpt2", tokenizer_dir)
    tokens = M.random_tokens(4, 6)
    bases = tl_degen.fit_bases(model, tokens, ["resid_pre.1", "resid_mid.1"], progress=False)
    with pytest.raises(tl_degen.TLDegenError, match="unknown route"):
        tl_degen.interaction_graph(model, tokens, bases, route="sideways", progress=False)
    with pytest.raises(tl_degen.TLDegenError, match="needs n_probes"):
        tl_degen.interaction_graph(model, tokens, bases, route="probes", progress=False)


def test_pullbacks_in_passes_spanning_positions_equal_one_at_a_time(tokenizer_dir):
    """Several (output position, direction) pairs per batched pullback, passes crossing from
    one output position to the next: the same pullbacks as one pair per pass."""
    from tl_degen.adapters import get_adapter
    from tl_degen.model_state import prepared
    from tl_degen.sections import ModelSection
    from tl_degen.sections.autograd import autograd_pullbacks
    from tl_degen.sites import Site

    model = M.build("native_ln_gelu", tokenizer_dir)
    adapter = get_adapter(model)
    tokens = M.random_tokens(5, 4)
    a, b = Site.parse("resid_pre.1"), Site.parse("resid_mid.1")
    with prepared(model, torch.float64):
        (x,) = adapter.read_sites(tokens, [a])
        C = torch.randn(17, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        results = {}
        for chunk in (1, 5):  # 4 positions × 6 directions: passes of 5 straddle positions
            got = {}
            run = ModelSection(adapter, a, b, tokens.shape[1]).run(tokens)
            for pb in autograd_pullbacks(run, x, C, alphas=[1.0], weights=[1.0], chunk=chunk):
                for m, d in enumerate(pb.dirs.tolist()):
                    got[(pb.t, d)] = pb.g[..., m]
            results[chunk] = got
    assert sorted(results[1]) == sorted(results[5]) == [(t, d) for t in range(4)
                                                        for d in range(6)]
    for key, g in results[1].items():
        torch.testing.assert_close(results[5][key], g, rtol=0, atol=1e-12)


def test_probes_per_pass_shrink_with_the_tokens():
    from tl_degen.sections.probes import BATCHED_PROBE_TOKENS, probes_per_pass

    assert probes_per_pass(16 * 12) == 8  # small batches: eight probes per pullback
    assert probes_per_pass(16 * 128) == 1  # long prompts: one at a time
    assert probes_per_pass(BATCHED_PROBE_TOKENS // 3) == 3
    assert probes_per_pass(0) == 8
