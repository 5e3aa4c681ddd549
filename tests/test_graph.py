"""Interaction graphs (DESIGN.md §4 step 8): reference edges, identities, pruning, export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tl_degen
from tests import models as M
from tl_degen import InteractionGraph, Site, TLDegenError
from tl_degen.basis import InteractionBasis
from tl_degen.basis_set import BasisSet
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
LAYERS = [("ln1.0", "resid_pre.0"), ("ln2.0", "resid_mid.0:last"),
          ("unembed", "resid_post.0:last")]
EDGE_KEYS = ["edges/ln1.0->ln2.0", "edges/ln2.0->unembed", "edges/unembed->output"]


@pytest.fixture(scope="module")
def reference_setting(reference_dir):
    model = modadd.load_bridge(modadd.load_state_dict(reference_dir / "model.safetensors"))
    tokens = modadd.tokens_for(modadd.train_test_split()[0])
    return model, tokens


def reference_bases(ref, ours: BasisSet) -> BasisSet:
    """The reference's own C, C⁺ (and Λ) as a BasisSet, to test the edge computation alone."""
    out = []
    for layer, site in LAYERS:
        o, C = ours[site], ref[f"{layer}/C"]
        lam = ref.get(f"{layer}/Lambda")
        lam = (torch.cat([lam[:1], lam[1:].sort(descending=True).values])[: C.shape[1]]
               if lam is not None else torch.ones(C.shape[1], dtype=torch.float64))
        out.append(InteractionBasis(site=Site.parse(site), method=o.method, C=C,
                                    C_pinv=ref[f"{layer}/C_pinv"], eigenvalues=lam,
                                    mean=o.mean, gram=o.gram,
                                    gram_eigenvalues=o.gram_eigenvalues))
    out.append(ours["logits:last"])
    return BasisSet(out, config=ours.config, model_signature=ours.model_signature,
                    model_probe=ours.model_probe)


def leading(lam: torch.Tensor) -> int:
    return int((lam > 1e-8 * lam.max()).sum())


@pytest.mark.parametrize("method", ["lib", "pca"])
def test_reference_edges(method, reference_setting, reference_dir):
    """Edges within 1e-4 of the reference on the leading blocks, edge sums within 1e-4 —
    with the reference's bases (the edge computation alone) and with our own bases."""
    model, tokens = reference_setting
    ref = load_file(str(reference_dir / f"{method}_graph.safetensors"))
    ours = tl_degen.fit_bases(model, tokens, SITES, method=method, batch_size=4000,
                              threshold=tl_degen.Threshold.absolute(1e-15), progress=False)
    for bases in (reference_bases(ref, ours), ours):
        graph = tl_degen.interaction_graph(model, tokens, bases, batch_size=4000,
                                           progress=False)
        for (a, b), key in zip(graph.pairs(), EDGE_KEYS):
            E, R = graph.edges[(a, b)], ref[key]
            assert abs(E.sum() - R.sum()) <= 1e-4 * R.sum(), key
            n_out = leading(bases[b].eigenvalues) if b.kind != "logits" else R.shape[0]
            n_in = leading(bases[a].eigenvalues)
            block, ref_block = E[:n_out, :n_in], R[:n_out, :n_in]
            assert ((block - ref_block).abs() <= 1e-4 * ref_block.abs().max()).all(), key


def test_closed_form_edges_equal_autograd_edges():
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.all_pairs()[::97])
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    graphs = [tl_degen.interaction_graph(model, tokens, bases, progress=False,
                                         integration="trapezoid", n_alpha=3, closed_form=c)
              for c in (True, False)]
    for pair in graphs[0].pairs():
        a, b = graphs[0].edges[pair], graphs[1].edges[pair]
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), pair


def test_linear_section_gives_diagonal_edges():
    """mlp_post → resid_post is linear: its LIB edge matrix is diagonal, with Λ on it."""
    model = M.build("native_relu")
    tokens = M.random_tokens(200, 6)
    sites = ["mlp_post.1:last", "resid_post.1:last", "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    E = tl_degen.interaction_graph(model, tokens, bases, progress=False).edge(*sites[:2])
    assert E.shape[0] == E.shape[1]
    off = E - torch.diag(E.diagonal())
    assert off.abs().max() <= 1e-12 * E.max()
    lam = bases[sites[0]].eigenvalues
    assert (E.diagonal() - lam).abs().max() <= 1e-10 * lam.max()


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_graph_on_other_architectures(arch, tokenizer_dir):
    model = M.build(arch, tokenizer_dir)
    tokens = M.random_tokens(8, 5)
    bases = tl_degen.fit_bases(model, tokens, M.mid_sites(arch), progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    assert len(graph.pairs()) == len(M.mid_sites(arch)) - 1
    for (a, b), E in graph.edges.items():
        assert E.shape == (bases[b].k, bases[a].k) and (E >= 0).all() and E.sum() > 0


# ---------------------------------------------------------------------- graph object
def toy_graph(blocks=((3, 3), (2, 2)), seed=0, noise=1e-3) -> InteractionGraph:
    """Three sites of ``sum(blocks)`` nodes each (no constant node), block-diagonal edges."""
    g = torch.Generator().manual_seed(seed)
    n = sum(b[0] for b in blocks)
    eye = torch.eye(n, dtype=torch.float64)
    names = ["resid_pre.0", "resid_mid.0", "resid_post.0"]
    bases = BasisSet([InteractionBasis(site=Site.parse(s), method="neuron", C=eye, C_pinv=eye,
                                       eigenvalues=torch.ones(n, dtype=torch.float64),
                                       mean=torch.zeros(n, dtype=torch.float64), gram=eye,
                                       gram_eigenvalues=torch.ones(n, dtype=torch.float64),
                                       center=False) for s in names])
    mask = torch.block_diag(*[torch.ones(r, c, dtype=torch.float64) for r, c in blocks])
    edges = {}
    for a, b in zip(names, names[1:]):
        E = mask * (1 + torch.rand(n, n, generator=g, dtype=torch.float64)) + \
            noise * torch.rand(n, n, generator=g, dtype=torch.float64)
        edges[(Site.parse(a), Site.parse(b))] = E
    return InteractionGraph(bases, edges)


def test_modules_recover_planted_blocks():
    graph = toy_graph(blocks=((4, 4), (3, 3), (2, 2)))
    mods = graph.modules(resolution=1.0, seed=0)
    for site in graph.sites:
        ids = [mods.membership[f"{site.name}/{j}"] for j in range(9)]
        assert len(set(ids[:4])) == 1 and len(set(ids[4:7])) == 1 and len(set(ids[7:])) == 1
    assert len(mods.clusters) == 3 and mods.modularity > 0.5
    assert "Q=" in repr(mods)


def test_prune():
    E = torch.tensor([[4.0, 1.0, 0.5], [3.0, 2.0, 0.1]], dtype=torch.float64)
    graph = toy_graph(blocks=((3, 3),))
    pair = graph.pairs()[0]
    graph.edges[pair] = torch.zeros(3, 3, dtype=torch.float64)
    graph.edges[pair][:2] = E
    by_threshold = graph.prune(threshold=1.0).edges[pair]
    assert int((by_threshold > 0).sum()) == 4  # 4, 1, 3, 2
    top1 = graph.prune(top_k=1).edges[pair]
    assert top1[0].tolist() == [4.0, 0, 0] and top1[1].tolist() == [3.0, 0, 0]
    total = E.sum()
    kept = graph.prune(mass=0.6).edges[pair]
    assert kept.sum() >= 0.6 * total and int((kept > 0).sum()) == 2  # 4 + 3 = 7 of 10.6
    with pytest.raises(TLDegenError, match="exactly one"):
        graph.prune()
    with pytest.raises(TLDegenError, match="mass must be at most 1"):
        graph.prune(mass=1.5)


def test_constant_node_edges_survive_pruning():
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.all_pairs()[::311])
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    pruned = graph.prune(top_k=0)
    for (a, b), E in pruned.edges.items():
        assert (E[:, 0] == graph.edges[(a, b)][:, 0]).all() and (E[:, 1:] == 0).all()


def test_export_and_roundtrip(tmp_path):
    graph = toy_graph()
    G = graph.to_networkx()
    assert G.number_of_nodes() == 15 and G.number_of_edges() == 2 * 25
    data = json.loads(graph.to_json())
    assert data["format"] == "tl_degen.interaction_graph" and len(data["edges"]) == 50
    e = data["edges"][0]
    assert e["source"].startswith("resid_pre.0/") and e["target"].startswith("resid_mid.0/")
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.all_pairs()[::311])
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    real = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    path = real.save(tmp_path / "g.safetensors")
    again = InteractionGraph.load(path, model=model)
    for pair in real.pairs():
        assert torch.equal(real.edges[pair], again.edges[pair])
    assert "nonzero" in repr(again) and list(tmp_path.iterdir()) == [path]
    with pytest.raises(tl_degen.DataError, match="no interaction graph"):
        InteractionGraph.load(bases.save(tmp_path / "b.safetensors"))
