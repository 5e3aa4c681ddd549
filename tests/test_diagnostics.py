"""Degeneracy report (planted degeneracies found with their counts), reparameterisations
(function-preserving, checked), and the invariance check (LIB patching unchanged, neuron-basis
patching changed)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import reparam
from tl_degen.errors import BackendError, TLDegenError
from tl_degen.toy import modadd
from tl_degen.toy.modadd import ModAddConfig

SMALL = ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64)
# rotate_residual needs an RMSNorm model (tests/test_invariance.py, Llama)
NATIVE_REPARAMETERISATIONS = [n for n in reparam.REPARAMETERISATIONS if n != "rotate_residual"]
SITES = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]
try:  # rebuilding a native bridge from TL-format weights needs TransformerLens 4
    from transformer_lens.utilities.tl_checkpoint_conversion import (  # noqa: F401
        convert_tl_checkpoint,
    )

    LOADERS = [modadd.load_bridge]
except ImportError:
    LOADERS = []
LOADERS += [modadd.load_hooked_transformer] if M.HAS_HOOKED_TRANSFORMER else []


@pytest.fixture(scope="module")
def small():
    """A random modadd-architecture model whose residual sites have full rank."""
    sd, _, tokens = M.full_rank_modadd(600)
    return sd, tokens


def report(sd, cfg, tokens):
    model = modadd.load_bridge(sd, cfg=cfg, dtype=torch.float64)
    return tl_degen.degeneracy_report(model, tokens, SITES, progress=False)


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def plant_duplicate_neuron(sd, tokens, j):
    out = dict(sd)
    m = "blocks.0.mlp."
    out[m + "W_in"] = torch.cat([sd[m + "W_in"], sd[m + "W_in"][:, j : j + 1]], 1)
    out[m + "b_in"] = torch.cat([sd[m + "b_in"], sd[m + "b_in"][j : j + 1]])
    out[m + "W_out"] = torch.cat([sd[m + "W_out"], sd[m + "W_out"][j : j + 1]])
    return out, replace(SMALL, d_mlp=65)


def plant_dead_neuron(sd, tokens):
    out = dict(sd)
    m = "blocks.0.mlp."
    out[m + "W_in"] = torch.cat([sd[m + "W_in"], sd[m + "W_in"][:, :1]], 1)
    out[m + "b_in"] = torch.cat([sd[m + "b_in"], torch.tensor([-1e4], dtype=torch.float64)])
    out[m + "W_out"] = torch.cat([sd[m + "W_out"], sd[m + "W_out"][:1]])
    return out, replace(SMALL, d_mlp=65)


def plant_unwritten_direction(sd, tokens):
    """Every writer of the residual stream projected off one direction v."""
    v = _unit(SMALL.d_model, 10)
    P = torch.eye(SMALL.d_model, dtype=torch.float64) - torch.outer(v, v)
    out = dict(sd)
    for k in ("embed.W_E", "pos_embed.W_pos", "blocks.0.attn.W_O", "blocks.0.attn.b_O",
              "blocks.0.mlp.W_out", "blocks.0.mlp.b_out"):
        out[k] = sd[k] @ P
    return out, SMALL


def plant_unread_direction(sd, tokens):
    """Every reader of the residual stream projected off one direction u."""
    u = _unit(SMALL.d_model, 11)
    P = torch.eye(SMALL.d_model, dtype=torch.float64) - torch.outer(u, u)
    out = dict(sd)
    for k in ("blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V"):
        out[k] = torch.einsum("dD,hDe->hde", P, sd[k])
    out["blocks.0.mlp.W_in"] = P @ sd["blocks.0.mlp.W_in"]
    out["unembed.W_U"] = P @ sd["unembed.W_U"]
    return out, SMALL


def plant_cofiring_pair(sd, tokens, j, k):
    """Neuron k := neuron j plus a small other direction: the same firing set on the data
    (margin checked), but not proportional."""
    model = modadd.load_bridge(sd, cfg=SMALL, dtype=torch.float64)
    x = tl_degen.site_activations(model, tokens, "resid_mid.0:last")[..., :-1].reshape(-1, 32)
    m = "blocks.0.mlp."
    pre0 = x @ sd[m + "W_in"][:, j] + sd[m + "b_in"][j]
    w = _unit(SMALL.d_model, 12)
    eta = 0.5 * float(pre0.abs().min() / (x @ w).abs().max())
    out = dict(sd)
    W_in, b_in = sd[m + "W_in"].clone(), sd[m + "b_in"].clone()
    W_in[:, k], b_in[k] = W_in[:, j] + eta * w, b_in[j]
    out[m + "W_in"], out[m + "b_in"] = W_in, b_in
    assert torch.equal((x @ W_in[:, k] + b_in[k]) > 0, pre0 > 0)
    return out, SMALL


def plant_identical_heads(sd, tokens):
    out = dict(sd)
    a = "blocks.0.attn."
    for k in ("W_Q", "W_K", "b_Q", "b_K"):
        t = sd[a + k].clone()
        t[1] = t[0]
        out[a + k] = t
    return out, SMALL


def test_planted_degeneracies_are_found_with_their_counts(small):
    sd, tokens = small
    base = report(sd, SMALL, tokens)
    # the premise: the random model itself has none of these
    for s in ("resid_pre.0", "resid_mid.0:last", "resid_post.0:last"):
        assert base.site(s).type1 == 0, s
    lay = base.layer(0)
    assert lay.identical_head_groups == []
    # random ReLUs: some never fire on these prompts, some always fire (and so co-fire);
    # plant into two that do neither
    dead, groups = set(lay.dead_neurons), lay.cofiring_groups
    j, k = [i for i in range(SMALL.d_mlp) if i not in dead and all(i not in g for g in groups)][:2]

    def delta(rep, site, attr):
        return getattr(rep.site(site), attr) - getattr(base.site(site), attr)

    def new_groups(rep):
        return [g for g in rep.layer(0).cofiring_groups if g not in groups]

    rep = report(*plant_duplicate_neuron(sd, tokens, j), tokens)
    assert new_groups(rep) == [[j, 64]] and rep.layer(0).n_cofiring == lay.n_cofiring + 1
    assert delta(rep, "mlp_post.0:last", "type1") == 1

    rep = report(*plant_dead_neuron(sd, tokens), tokens)
    assert set(rep.layer(0).dead_neurons) - dead == {64} and new_groups(rep) == []
    assert delta(rep, "mlp_post.0:last", "type1") == 1

    rep = report(*plant_unwritten_direction(sd, tokens), tokens)
    for s in ("resid_pre.0", "resid_mid.0:last", "resid_post.0:last"):
        assert delta(rep, s, "type1") == 1, s
    # mlp_post loses the direction in its bypass part, and more: the always-firing (linear)
    # neurons are linear in the residual stream, so their span shrinks with it
    assert delta(rep, "mlp_post.0:last", "type1") >= 1
    # free directions in the weights reading resid_mid: one null direction × d_mlp columns
    assert rep.site("resid_mid.0:last").free_read == SMALL.d_mlp

    rep = report(*plant_unread_direction(sd, tokens), tokens)
    # (mlp_post is left out: projecting W_in also changes which neurons are dead)
    for s in ("resid_pre.0", "resid_mid.0:last", "resid_post.0:last"):
        assert delta(rep, s, "type1") == 0, s
        assert delta(rep, s, "type2") == 1, s

    rep = report(*plant_cofiring_pair(sd, tokens, j, k), tokens)
    assert new_groups(rep) == [[j, k]]
    assert delta(rep, "mlp_post.0:last", "type1") == 0  # same firing set, not proportional

    rep = report(*plant_identical_heads(sd, tokens), tokens)
    assert rep.layer(0).identical_head_groups == [[0, 1]] and new_groups(rep) == []
    text = repr(rep)
    assert "identical-head groups" in text and "{0,1}" in text
    assert rep.as_dict()["layers"][0]["n_identical_heads"] == 1


def test_jaccard_tolerance_merges_nearly_cofiring_neurons(small):
    sd, tokens = small
    model = modadd.load_bridge(sd, cfg=SMALL, dtype=torch.float64)
    strict = tl_degen.degeneracy_report(model, tokens, SITES, progress=False)
    loose = tl_degen.degeneracy_report(model, tokens, SITES, bases=None, jaccard_tolerance=0.9,
                                       progress=False)
    assert strict.layer(0).n_cofiring < loose.layer(0).n_cofiring


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", NATIVE_REPARAMETERISATIONS)
def test_reparameterisations_preserve_the_function(small, loader, name):
    sd, tokens = small
    model = loader(sd, cfg=SMALL, dtype=torch.float64)
    new = reparam.REPARAMETERISATIONS[name](model)
    assert type(new) is type(model) and new is not model
    with torch.no_grad():
        before, after = model(tokens[:100]), new(tokens[:100])
    assert (after - before).abs().max() < 1e-10 * before.abs().max()
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), new.parameters())
                  if a.shape == b.shape) or sum(p.numel() for p in new.parameters()) != sum(
        p.numel() for p in model.parameters())
    assert changed


def test_reparameterisations_refuse_what_they_cannot_preserve(tokenizer_dir):
    ln = M.build("native_ln_gelu")
    with pytest.raises(TLDegenError, match="only without LayerNorm"):
        reparam.change_residual_basis(ln)
    with pytest.raises(TLDegenError, match="only for ReLU"):
        reparam.rescale_neurons(ln)
    with pytest.raises(BackendError, match="native TransformerBridge|HookedTransformer"):
        reparam.permute_neurons(M.build("gpt2", tokenizer_dir))
    with pytest.raises(BackendError, match="rotate_residual supports"):
        reparam.rotate_residual(ln)  # LayerNorm's centring does not commute with a rotation
    with pytest.raises(TLDegenError, match="unknown reparameterisation 'flip'"):
        tl_degen.check_invariance(ln, M.random_tokens(), ["resid_pre.0", "logits"], "flip")
    with pytest.raises(TLDegenError, match="must preserve the function"):
        tl_degen.check_invariance(ln, M.random_tokens(), ["resid_pre.1", "logits"],
                                  lambda m: M.build("native_ln_gelu", seed=5))


@pytest.mark.parametrize("name", NATIVE_REPARAMETERISATIONS)
def test_lib_patching_is_invariant_and_neuron_patching_is_not(small, name):
    sd, tokens = small
    model = LOADERS[0](sd, cfg=SMALL, dtype=torch.float64)
    clean, corrupted, ld = modadd.patching_pairs(100, seed=3)
    rep = tl_degen.check_invariance(model, tokens, SITES, name, methods=("lib", "neuron"),
                                    clean_tokens=clean, corrupted_tokens=corrupted, metric=ld,
                                    progress=False)
    assert rep.function_change < 1e-10
    for row in rep.rows:
        if row["method"] == "lib":
            assert row["k_before"] == row["k_after"], row
            assert row["eigenvalue_change"] < 1e-6 and row["patching_change"] < 1e-6, row
    touched = "resid_post.0:last" if name == "change_residual_basis" else "mlp_post.0:last"
    (neuron,) = [r for r in rep.rows if r["method"] == "neuron" and r["site"] == touched]
    if name == "permute_heads":
        # heads are no site's coordinates: every basis is unchanged
        assert rep.worst("lib") < 1e-6 and rep.worst("neuron") < 1e-6
    elif name == "rescale_neurons":
        # patching one whole neuron does not depend on its scale; its coordinates do
        assert neuron["coordinate_change"] > 1e-2 and neuron["eigenvalue_change"] > 1e-2, neuron
        assert rep.worst("lib", "coordinate_change") < 1e-6
    else:
        assert neuron["patching_change"] > 1e-2, neuron
        assert rep.worst("lib") < 1e-6 < rep.worst("neuron")
    assert "patching" in repr(rep) and "LIB targets" in repr(rep)


def test_report_and_invariance_take_the_settings_of_a_language_model_fit(tokenizer_dir):
    """``dtype``, ``n_probes`` and ``target_error`` reach the fit (a LayerNorm model, whose
    Jacobian Grams are probed): the report's basis sizes are those of ``fit_bases`` with the
    same settings (the same probes), and a stochastic invariance check of a Llama model
    still holds for LIB (both models draw the same probes in the same coordinates)."""
    model = M.build("native_ln_gelu")
    tokens = M.random_tokens(48, 6)
    sites = M.mid_sites("native_ln_gelu")
    kw = dict(dtype=torch.float32, n_probes=8, target_error=0.5)
    rep = tl_degen.degeneracy_report(model, tokens, sites, progress=False, **kw)
    bases = tl_degen.fit_bases(model, tokens, sites, threshold=1e-10, progress=False, **kw)
    assert rep.lib_sizes == {s.name: bases[s].k for s in bases.sites if s.kind != "logits"}
    assert any(bases[s].jacobian_gram_error for s in bases.sites)  # probed: the setting took
    llama = M.build("llama", tokenizer_dir)  # (its reparameterisations need no rebuild)
    inv = tl_degen.check_invariance(llama, tokens, M.mid_sites("llama"), "permute_neurons",
                                    methods=("lib",), n_probes=8, progress=False)
    assert inv.holds("lib") and inv.worst("lib", "eigenvalue_change") < 1e-10
