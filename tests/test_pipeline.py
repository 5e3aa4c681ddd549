"""Whole-model runs: every_layer names the cuts, fit_and_graph runs the fit and the graph
under one bar and resumes from its folder, interaction_graph resumes from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import CheckpointError, SiteError
from tl_degen.progress import RunBar
from tl_degen.toy import modadd


@pytest.mark.parametrize("arch", ["native_relu", "native_ln_gelu", "llama"])
def test_every_layer_names_every_cut_in_forward_order(arch, tokenizer_dir):
    model = M.build(arch, tokenizer_dir)
    assert tl_degen.every_layer(model) == [
        "resid_pre.0", "resid_mid.0", "resid_pre.1", "resid_mid.1", "resid_post.1:last",
        "logits:last"]
    assert tl_degen.every_layer(model, ("resid_post", "resid_pre"), end="logits") == [
        "resid_pre.0", "resid_post.0", "resid_pre.1", "resid_post.1", "logits"]
    assert tl_degen.every_layer(model, "resid_mid", layers=[1], end="resid_post:last") == [
        "resid_mid.1", "resid_post.1:last"]
    assert tl_degen.every_layer(model, end=None)[-1] == "resid_mid.1"
    sites = tl_degen.every_layer(model)
    tl_degen.sites.check_forward_order(tl_degen.sites.parse_sites(sites))


@pytest.mark.parametrize("kwargs, phrase", [
    ({"kinds": ("resid_side",)}, "give distinct block site kinds"),
    ({"kinds": ("resid_pre", "resid_pre")}, "give distinct block site kinds"),
    ({"kinds": ()}, "give distinct block site kinds"),
    ({"layers": [2]}, r"increasing block indices in \[0, 2\)"),
    ({"layers": [1, 0]}, "increasing block indices"),
    ({"layers": [True]}, "increasing block indices"),
    ({"end": "logits:0"}, "use 'logits:last'"),
])
def test_every_layer_refuses_what_it_cannot_name(kwargs, phrase):
    with pytest.raises(SiteError, match=phrase):
        tl_degen.every_layer(M.build("native_relu"), **kwargs)


def test_every_layer_of_parallel_blocks_has_no_resid_mid(tokenizer_dir):
    model = M.build("neox", tokenizer_dir)
    with pytest.raises(SiteError, match="in parallel"):
        tl_degen.every_layer(model)
    assert tl_degen.every_layer(model, ("resid_pre",))[:2] == ["resid_pre.0", "resid_pre.1"]


@pytest.fixture(scope="module")
def modadd_run():
    model = modadd.load_bridge(dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:400])
    return model, tokens, tl_degen.every_layer(model)


def test_fit_and_graph_equals_its_two_verbs_and_counts_every_batch(modadd_run, tmp_path):
    model, tokens, sites = modadd_run
    bases = tl_degen.fit_bases(model, tokens, sites, batch_size=100, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, batch_size=100, progress=False)
    both = tl_degen.fit_and_graph(model, tokens, sites, batch_size=100, progress=False)
    assert isinstance(both, tl_degen.FitAndGraph)
    for s in sites:
        assert torch.equal(both.bases[s].C, bases[s].C)
    for pair, E in graph.edges.items():
        assert torch.equal(both.graph.edges[pair], E)
    assert set(both.graph.config["edge_seconds"]) == set(graph.config["edge_routes"])
    # one bar over both: 4 batches × (moments + 3 Jacobian stages + 3 pairs)
    with RunBar(4 * 7, disable=True) as bar:
        b = tl_degen.fit_bases(model, tokens, sites, batch_size=100, progress=bar)
        assert bar.done == 4 * 4
        tl_degen.interaction_graph(model, tokens, b, batch_size=100, progress=bar)
        assert bar.done == bar.bar.total == 4 * 7


def test_an_interrupted_graph_resumes_from_its_checkpoint(modadd_run, tmp_path, monkeypatch):
    import tl_degen.graph as graph_module

    model, tokens, sites = modadd_run
    bases = tl_degen.fit_bases(model, tokens, sites, batch_size=100, progress=False)
    whole = tl_degen.interaction_graph(model, tokens, bases, batch_size=100, progress=False)
    ckpt = tmp_path / "graph.ckpt.safetensors"
    real, calls, armed = graph_module._edge_sums, [], [True]

    def dies_on_the_second_pair(*args, **kwargs):
        calls.append(args[5])
        if armed[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(graph_module, "_edge_sums", dies_on_the_second_pair)
    with pytest.raises(KeyboardInterrupt):
        tl_degen.interaction_graph(model, tokens, bases, batch_size=100, progress=False,
                                   checkpoint=ckpt)
    assert ckpt.exists()
    other = tl_degen.fit_bases(model, tokens, sites, batch_size=100, threshold=1e-8,
                               progress=False)
    with pytest.raises(CheckpointError, match="belongs to another run.*bases"):
        tl_degen.interaction_graph(model, tokens, other, batch_size=100, progress=False,
                                   checkpoint=ckpt)
    calls.clear()
    armed[0] = False
    resumed = tl_degen.interaction_graph(model, tokens, bases, batch_size=100, progress=False,
                                         checkpoint=ckpt)
    assert calls == [1, 2]  # the first pair came from the checkpoint
    for pair, E in whole.edges.items():
        assert torch.equal(resumed.edges[pair], E)
    assert resumed.config["edge_routes"] == whole.config["edge_routes"]
    assert not ckpt.exists()  # served and removed


def test_fit_and_graph_keeps_its_state_in_a_folder(modadd_run, tmp_path, monkeypatch):
    import tl_degen.pipeline as pipeline

    model, tokens, sites = modadd_run
    folder = tmp_path / "run"
    first = tl_degen.fit_and_graph(model, tokens, sites, folder=folder, batch_size=100,
                                   progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "bases.safetensors", "graph.safetensors", "run.json"]
    assert json.loads((folder / "run.json").read_text())["sites"] == sites

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run is loaded, not computed again")

    monkeypatch.setattr(pipeline, "fit_bases", no_work)
    monkeypatch.setattr(pipeline, "interaction_graph", no_work)
    again = tl_degen.fit_and_graph(model, tokens, sites, folder=folder, batch_size=100,
                                   progress=False)
    for pair, E in first.graph.edges.items():
        assert torch.equal(again.graph.edges[pair], E)
    with pytest.raises(CheckpointError, match="differs in threshold"):
        tl_degen.fit_and_graph(model, tokens, sites, folder=folder, batch_size=100,
                               threshold=1e-10, progress=False)
    with pytest.raises(CheckpointError, match="differs in tokens"):
        tl_degen.fit_and_graph(model, tokens[:200], sites, folder=folder, batch_size=100,
                               progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(CheckpointError, match="not empty"):
        tl_degen.fit_and_graph(model, tokens, sites, folder=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"


@pytest.mark.parametrize("arch", ["native_ln_gelu", "gpt2", "llama"])
def test_whole_model_closed_forms_equal_autograd(arch, tokenizer_dir):
    """Every layer of a two-layer model: the bases and graph through the closed forms (the
    MLP after ln2, the final norm and unembedding) and formulas equal autograd's through the
    model (Llama's RMSNorm runs in float32 inside Hugging Face: 1e-6 there)."""
    model = M.build(arch, tokenizer_dir)
    tokens = M.random_tokens(16, 6)
    sites = tl_degen.every_layer(model)
    runs = [tl_degen.fit_and_graph(model, tokens, sites, closed_form=closed, progress=False)
            for closed in (True, False)]
    tol = 1e-6 if arch == "llama" else 1e-9
    routes = runs[0].graph.config["edge_routes"]
    # the MLP after ln2 into the next block's resid_pre (the same vector as resid_post)
    assert routes["resid_mid.0->resid_pre.1"] == "closed form", routes
    assert routes["resid_mid.1->resid_post.1:last"] == "closed form", routes
    for s in sites:
        a, b = runs[0].bases[s].eigenvalues, runs[1].bases[s].eigenvalues
        assert a.shape == b.shape and (a - b).abs().max() <= tol * b.abs().max(), s
    for pair, E in runs[1].graph.edges.items():
        F = runs[0].graph.edges[pair]
        assert (F - E).abs().max() <= tol * E.abs().max(), pair


def test_fit_and_graph_refused_leaves_no_folder(modadd_run, tmp_path):
    model, tokens, sites = modadd_run
    with pytest.raises(tl_degen.TLDegenError, match="unknown method"):
        tl_degen.fit_and_graph(model, tokens, sites, folder=tmp_path / "new", method="svd",
                               progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(tl_degen.ArgumentError, match="dtype"):
        tl_degen.fit_and_graph(model, tokens, sites, folder=tmp_path / "new",
                               dtype=torch.bfloat16, progress=False)
    assert not (tmp_path / "new").exists()
