"""Patching and attribution in basis coordinates: exact identities, independent checks
against TransformerLens's own patching and gradient caches, and both backends."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.sites import Site
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]
PATCH_SITES = SITES[:-1]


@pytest.fixture(scope="module")
def toy():
    """The shipped model (float64), bases of all three methods, 120 clean/corrupted pairs."""
    model = modadd.load_bridge(dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1500])
    bases = {m: tl_degen.fit_bases(model, tokens, SITES, method=m, batch_size=1500,
                                   progress=False) for m in ("lib", "pca", "neuron")}
    clean, corrupted, logit_diff = modadd.patching_pairs(120, seed=1)
    return model, tokens, bases, clean, corrupted, logit_diff


def close(a, b, rtol=1e-9, scale=None):
    scale = max(abs(float(b)), 1.0) if scale is None else scale
    return abs(float(a) - float(b)) <= rtol * scale


@pytest.mark.parametrize("method", ["lib", "pca", "neuron"])
@pytest.mark.parametrize("site", PATCH_SITES)
def test_patching_identities(toy, method, site):
    model, _, bases, clean, corrupted, ld = toy
    basis = bases[method][site]
    k = basis.k
    res = tl_degen.patch_directions(model, clean, corrupted, bases[method], site, ld,
                                    directions=[[], list(range(k))], progress=False)
    # patching nothing is the corrupted run; patching every kept direction is `all_value`
    assert close(res.values[0], res.corrupted, 1e-10, abs(res.clean - res.corrupted))
    assert close(res.values[1], res.all_value, 1e-12)
    # the whole site patched restores the clean run wherever the site is a cut of the output
    # (the last position's logits depend on the last position only through these sites)
    assert close(res.site_value, res.clean, 1e-9, abs(res.clean - res.corrupted))
    gap = abs(res.clean - res.corrupted)
    if basis.dropped.total == 0:  # nothing dropped: all directions = the whole site, exactly
        assert close(res.all_value, res.site_value, 1e-9, gap)
    else:  # dropped directions carry (almost) nothing: measured, at most 1e-3 of the gap
        assert abs(res.all_value - res.site_value) < 1e-3 * gap
    # identical clean and corrupted inputs: no patch changes anything
    same = tl_degen.patch_directions(model, clean, clean, bases[method], site, ld,
                                     directions=[[j] for j in range(0, k, max(1, k // 7))],
                                     progress=False)
    assert same.effects.abs().max() <= 1e-9 * max(abs(same.clean), 1.0)


def test_noising_patches_corrupted_coordinates_into_the_clean_run(toy):
    """Noising runs the clean prompt: patching nothing gives the clean metric, patching the
    whole cut site gives the corrupted one, and each direction's effect has the opposite sign
    of its denoising effect on the strongest directions."""
    model, _, bases, clean, corrupted, ld = toy
    site = "resid_mid.0:last"
    noise = tl_degen.patch_directions(model, clean, corrupted, bases["lib"], site, ld,
                                      directions=[[], 1, 2, 3], mode="noising", progress=False)
    gap = abs(noise.clean - noise.corrupted)
    assert noise.base == noise.clean and close(noise.values[0], noise.clean, 1e-10, gap)
    assert close(noise.site_value, noise.corrupted, 1e-9, gap)
    denoise = tl_degen.patch_directions(model, clean, corrupted, bases["lib"], site, ld,
                                        directions=[1, 2, 3], progress=False)
    assert (noise.effects[1:] * denoise.effects < 0).all()


def test_whole_site_patch_equals_transformer_lens_patching(toy):
    """Our whole-site patch vs TransformerLens's own get_act_patch_resid_pre (per position),
    and on the bridge, resid_mid at the last position vs TL's attn_out patch there (the
    residual stream before attention is the same for both runs at that position)."""
    from transformer_lens import patching

    model, tokens, _, clean, corrupted, ld = toy
    _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: ld(logits).mean()  # noqa: E731  (TL wants a scalar)
    tl_pre = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    tl_attn = patching.get_act_patch_attn_out(model, corrupted, clean_cache, metric)
    for pos in range(3):
        site = f"resid_pre.0:{pos}"
        nb = tl_degen.fit_bases(model, tokens[:200], [site, "logits:last"], method="neuron",
                                progress=False)
        ours = tl_degen.patch_directions(model, clean, corrupted, nb, site, ld, directions=[],
                                         progress=False)
        assert close(ours.site_value, tl_pre[0, pos], 1e-6)  # TL returns float32
    ours = tl_degen.patch_directions(model, clean, corrupted, toy[2]["neuron"],
                                     "resid_mid.0:last", ld, directions=[], progress=False)
    assert torch.equal(clean[:, -1], corrupted[:, -1])
    assert close(ours.site_value, tl_attn[0, 2], 1e-6)


@pytest.mark.parametrize("method", ["lib", "pca", "neuron"])
def test_attribution_sums_to_the_neuron_basis(toy, method):
    model, _, bases, clean, corrupted, ld = toy
    attr = tl_degen.attribution_patch(model, clean, corrupted, bases[method], PATCH_SITES, ld,
                                      progress=False)
    ref = tl_degen.attribution_patch(model, clean, corrupted, bases["neuron"], PATCH_SITES, ld,
                                     progress=False)
    for s in PATCH_SITES:
        name = Site.parse(s).name
        neuron_total = float(ref.per_direction(s).sum())
        assert close(attr.total(s), neuron_total, 1e-10)
        assert close(float(attr.neuron[name].sum()), neuron_total, 1e-12)
        assert ref.dropped[name] == pytest.approx(0.0, abs=1e-10 * abs(neuron_total))


def test_attribution_matches_transformer_lens_gradient_cache(toy):
    """Neuron-basis attribution and to_basis(GradientCache) against TL 4's own attribution
    machinery; at resid_mid TL's bridge gradient misses the skip connection: refused."""
    pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    from transformer_lens.tools.analysis.attribution_patching import (
        cache_activation_and_gradient,
    )

    model, _, bases, clean, corrupted, ld = toy
    keep = lambda n: "resid" in n or n.endswith(("hook_post", "hook_mlp_out"))  # noqa: E731
    metric = lambda logits: ld(logits).mean()  # noqa: E731
    g_corr = cache_activation_and_gradient(model, corrupted, metric, names_filter=keep)
    g_clean = cache_activation_and_gradient(model, clean, metric, names_filter=keep,
                                            compute_gradient=False)
    ours = tl_degen.attribution_patch(model, clean, corrupted, bases["lib"], PATCH_SITES, ld,
                                      progress=False)
    for s in ["resid_pre.0", "mlp_post.0:last", "resid_post.0:last"]:
        b = bases["lib"][s]
        diff = tl_degen.to_basis(g_clean, b) - tl_degen.to_basis(g_corr, b)
        grad = tl_degen.to_basis(g_corr, b, kind="gradient")
        torch.testing.assert_close((diff * grad).sum(0), ours.attributions[b.site.name],
                                   rtol=1e-9, atol=1e-9)
    with pytest.raises(tl_degen.SiteError, match="miss the skip connection"):
        tl_degen.to_basis(g_corr, bases["lib"]["resid_mid.0:last"], kind="gradient")


def test_integrated_attribution_approaches_the_patch_effect(toy):
    model, _, bases, clean, corrupted, ld = toy
    errs = []
    for n in (2, 8):
        attr = tl_degen.attribution_patch(model, clean, corrupted, bases["lib"], ["resid_pre.0"],
                                          ld, method="integrated", n_alpha=n, progress=False)
        errs.append(abs(attr.total("resid_pre.0") - attr.delta["resid_pre.0"]))
    gap = abs(attr.delta["resid_pre.0"])
    assert errs[1] < errs[0] and errs[1] < 1e-3 * gap


def test_to_basis_kinds(toy):
    model, tokens, bases, *_ = toy
    b = bases["lib"]["resid_post.0:last"]
    x = tl_degen.site_activations(model, tokens[:50], b.site)
    _, cache = model.run_with_cache(tokens[:50])
    torch.testing.assert_close(tl_degen.to_basis(cache, b), b.to_coords(x))
    torch.testing.assert_close(tl_degen.to_basis(x[..., :-1], b), b.to_coords(x))
    # a difference has constant 0: centering cancels, coordinates subtract
    d = tl_degen.to_basis(x[1:, :, :-1] - x[:-1, :, :-1], b, kind="difference")
    torch.testing.assert_close(d, b.to_coords(x[1:]) - b.to_coords(x[:-1]))
    # gradients pair with differences: Δx̂ · ĝ = Δx C C⁺ gᵀ = Δx · g when nothing is dropped
    nb = bases["pca"]["resid_post.0:last"]
    assert nb.dropped.total == 0
    g = torch.randn(x.shape[0] - 1, 1, x.shape[-1] - 1, dtype=torch.float64)
    dn = tl_degen.to_basis(x[1:, :, :-1] - x[:-1, :, :-1], nb, kind="difference")
    gn = tl_degen.to_basis(g, nb, kind="gradient")
    assert close((dn * gn).sum(), ((x[1:, :, :-1] - x[:-1, :, :-1]) * g).sum(), 1e-10)
    mlp = bases["lib"]["mlp_post.0:last"]
    torch.testing.assert_close(
        tl_degen.to_basis(cache, mlp),
        mlp.to_coords(tl_degen.site_activations(model, tokens[:50], mlp.site)))


def test_path_patching_identities(toy):
    """An edge j -> every target reproduces the direction patch of j (out-site basis full);
    identical inputs change nothing; single edges of a linear section add up exactly."""
    model, tokens, bases, clean, corrupted, ld = toy
    graph = tl_degen.interaction_graph(model, tokens[:300], bases["neuron"], progress=False)
    for a, b in [("mlp_post.0:last", "resid_post.0:last"), ("resid_post.0:last", "logits:last")]:
        js = [3, 17, 100]
        pp = tl_degen.path_patch(model, clean, corrupted, graph, a, b, ld,
                                 edges=[(j, None) for j in js], progress=False)
        direct = tl_degen.patch_directions(model, clean, corrupted, bases["neuron"], a, ld,
                                           directions=js, progress=False)
        torch.testing.assert_close(pp.values, direct.values, rtol=1e-10, atol=1e-9)
    lib_graph = tl_degen.interaction_graph(model, tokens[:300], bases["lib"], progress=False)
    pp = tl_degen.path_patch(model, clean, clean, lib_graph, "resid_mid.0:last",
                             "mlp_post.0:last", ld, top_k=5, progress=False)
    assert pp.effects.abs().max() < 1e-9 * abs(pp.base)
    assert len(pp.edges) == 5 and (pp.strengths[:-1] >= pp.strengths[1:]).all()
    # single edges into the logits, against a hand computation from the unembedding: edge
    # j -> i moves logit i by Δh_j (C⁺_in[j] · [W_U; b_U][:, i]), and the logit difference by
    # that amount where i is the right (+) or the wrong (−) answer of the example
    b_in = bases["lib"]["resid_post.0:last"]
    W = torch.cat([model.unembed.W_U, model.unembed.b_U[None]]).detach().double()
    M_ji = b_in.C_pinv.double() @ W  # [k_in, d_vocab]
    h = lambda t: b_in.to_coords(tl_degen.site_activations(model, t, b_in.site))[:, 0]  # noqa
    dh = h(clean) - h(corrupted)  # [batch, k_in]
    right = (clean[:, 0] + clean[:, 1]) % 113
    wrong = (corrupted[:, 0] + corrupted[:, 1]) % 113
    edges = [(1, int(right[0])), (2, int(wrong[0])), (5, int(right[3])), (3, 7)]
    pp = tl_degen.path_patch(model, clean, corrupted, lib_graph, "resid_post.0:last",
                             "logits:last", ld, edges=edges, progress=False)
    for n, (j, i) in enumerate(edges):
        sign = (right == i).double() - (wrong == i).double()
        expected = (dh[:, j] * M_ji[j, i] * sign).mean()
        assert close(pp.effects[n], expected, 1e-9, float(dh[:, j].abs().mean() * M_ji[j].abs()
                                                             .max())), (j, i)
    # the default edges leave out the constant node (its coordinate never changes)
    pp = tl_degen.path_patch(model, clean, corrupted, graph, "mlp_post.0:last",
                             "resid_post.0:last", ld, top_k=30, progress=False)
    assert all(j != bases["neuron"]["mlp_post.0:last"].k - 1 for j, _ in pp.edges)


@pytest.mark.skipif(not M.HAS_HOOKED_TRANSFORMER, reason="needs transformer_lens 3.x")
def test_bridge_and_hooked_transformer_patch_alike():
    """Same weights, both backends: per-direction patching and attribution agree, resid_mid
    included (the bridge writes it through hook_attn_out)."""
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:600])
    clean, corrupted, ld = modadd.patching_pairs(80, seed=2)
    out = []
    for loader in (modadd.load_bridge, modadd.load_hooked_transformer):
        model = loader(dtype=torch.float64)
        bases = tl_degen.fit_bases(model, tokens, SITES, method="neuron", progress=False)
        res = [tl_degen.patch_directions(model, clean, corrupted, bases, s, ld,
                                         directions=list(range(0, 129, 16)), progress=False)
               for s in ("resid_pre.0", "resid_mid.0:last")]
        attr = tl_degen.attribution_patch(model, clean, corrupted, bases, PATCH_SITES, ld,
                                          progress=False)
        out.append((res, attr))
    (r0, a0), (r1, a1) = out
    for x, y in zip(r0, r1):
        torch.testing.assert_close(x.values, y.values, rtol=1e-9, atol=1e-9)
        assert close(x.site_value, y.site_value, 1e-9)
    for s in PATCH_SITES:
        n = Site.parse(s).name
        torch.testing.assert_close(a0.attributions[n], a1.attributions[n], rtol=1e-8, atol=1e-8)


def test_patching_identities_on_every_architecture(arch, model):
    """On every backend and architecture: patching nothing is the corrupted run, identical
    inputs change nothing, attribution sums to the neuron basis, and all directions equal the
    whole site when the basis drops nothing."""
    sites = M.mid_sites(arch)
    clean, corrupted = M.random_tokens(10, 6, seed=1), M.random_tokens(10, 6, seed=2)
    lib = tl_degen.fit_bases(model, M.random_tokens(60, 6, seed=3), sites, progress=False)
    neuron = tl_degen.fit_bases(model, clean, sites, method="neuron", progress=False)

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 7]

    for s in sites[:-1]:
        for bases in (lib, neuron):
            k = bases[s].k
            res = tl_degen.patch_directions(model, clean, corrupted, bases, s, metric,
                                            directions=[[], list(range(k)), [0, k - 1]],
                                            progress=False)
            scale = max(abs(res.clean - res.corrupted), 1e-3)
            assert close(res.values[0], res.corrupted, 1e-9, scale), (s, bases.method)
            if bases[s].dropped.total == 0:
                assert close(res.all_value, res.site_value, 1e-9, scale), (s, bases.method)
            same = tl_degen.patch_directions(model, clean, clean, bases, s, metric,
                                             directions=[[0], [k - 1], list(range(k))],
                                             progress=False)
            assert same.effects.abs().max() <= 1e-9 * max(abs(same.clean), 1.0)
        attr = tl_degen.attribution_patch(model, clean, corrupted, lib, s, metric,
                                          progress=False)
        ref = tl_degen.attribution_patch(model, clean, corrupted, neuron, s, metric,
                                         progress=False)
        assert close(attr.total(s), float(ref.per_direction(s).sum()), 1e-9)


@pytest.fixture(scope="module")
def relu_setup():
    model = M.build("native_relu")
    other = M.build("native_relu", seed=7)
    sites = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "logits:last"]
    bases = tl_degen.fit_bases(model, M.random_tokens(30, 5, seed=4), sites, progress=False)
    return model, other, bases


def _narrow_model():
    """Like native_relu but d_model 8: a lone basis of the 16-wide model must not fit it."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(TransformerBridgeConfig(
        d_model=8, n_heads=2, d_head=4, d_mlp=12, n_layers=2, d_vocab=M.VOCAB, n_ctx=M.N_CTX,
        act_fn="relu", normalization_type=None)).eval()


def _metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 4]


BAD = [
    # (callable(model, other, bases), exception, message)
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 4),
                                               b, "resid_mid.1", _metric),
     tl_degen.DataError, r"differ in shape"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", lambda lg: lg[:, -1, :2]),
     tl_degen.TLDegenError, r"scalar tensor or one value per example"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", lambda lg: 1.0),
     tl_degen.TLDegenError, r"scalar tensor or one value per example"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", "logit_diff"),
     tl_degen.TLDegenError, r"metric must be a function of the logits"),
    (lambda m, o, b: tl_degen.patch_directions(o, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric),
     tl_degen.BasisMismatchError, r"different weights"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b["resid_pre.1"], "resid_mid.1", _metric),
     tl_degen.BasisMismatchError, r"fitted at site 'resid_pre.1', not 'resid_mid.1'"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_post.1", _metric),
     tl_degen.BasisMismatchError, r"other positions: \['resid_post.1:last'\]"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_post.0", _metric),
     tl_degen.BasisMismatchError, r"no basis for site 'resid_post.0'; fit bases"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_post.1:last", _metric, positions=[2]),
     tl_degen.DataError, r"position 2 is not one of site 'resid_post.1:last'"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, directions=[999]),
     tl_degen.DataError, r"direction\(s\) \[999\] out of range"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, directions=[[1, 1]]),
     tl_degen.DataError, r"repeats an index"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, directions=3),
     tl_degen.DataError, r"directions must be None, a list"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, positions=[True]),
     tl_degen.DataError, r"positions must be integers, got the boolean"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, positions=["1"]),
     tl_degen.DataError, r"positions must be integers, got '1'"),
    (lambda m, o, b: tl_degen.patch_directions(_narrow_model(), M.random_tokens(6, 5),
                                               M.random_tokens(6, 5), b["resid_mid.1"],
                                               "resid_mid.1", _metric),
     tl_degen.BasisMismatchError, r"has 17 coordinates but that site of this model has"),
    (lambda m, o, b: tl_degen.to_basis(m.run_with_cache(M.random_tokens(2, 5))[1],
                                       b["resid_mid.1"], kind="difference"),
     tl_degen.TLDegenError, r"a cache holds activations, not differences"),
    (lambda m, o, b: tl_degen.patch_directions(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                               b, "resid_mid.1", _metric, mode="clean->corrupt"),
     tl_degen.TLDegenError, r"mode must be 'denoising'"),
    (lambda m, o, b: tl_degen.attribution_patch(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                                b, "resid_mid.1", _metric, method="ig"),
     tl_degen.TLDegenError, r"method must be 'gradient' or 'integrated'"),
    (lambda m, o, b: tl_degen.attribution_patch(m, M.random_tokens(6, 5), M.random_tokens(6, 5),
                                                b, [], _metric),
     tl_degen.SiteError, r"at least one site"),
    (lambda m, o, b: tl_degen.to_basis(torch.zeros(3, 7), b["resid_mid.1"]),
     tl_degen.BasisMismatchError, r"size 7 do not fit site 'resid_mid.1'"),
    (lambda m, o, b: tl_degen.to_basis(torch.full((3, 16), float("nan")), b["resid_mid.1"]),
     tl_degen.DataError, r"NaN or Inf"),
    (lambda m, o, b: tl_degen.to_basis(torch.zeros(3, 16), b["resid_mid.1"], kind="grad"),
     tl_degen.TLDegenError, r"kind must be 'activation', 'difference' or 'gradient'"),
    (lambda m, o, b: tl_degen.degeneracy_report(
        m, M.random_tokens(30, 5, seed=4), ["resid_pre.1", "logits"],
        bases=tl_degen.fit_bases(m, M.random_tokens(30, 5), ["resid_pre.1", "logits"],
                                 method="pca", progress=False)),
     tl_degen.TLDegenError, r"needs LIB bases"),
]


def test_numpy_and_tensor_indices_are_accepted(relu_setup):
    import numpy as np

    model, _, bases = relu_setup
    clean, corrupted = M.random_tokens(6, 5), M.random_tokens(6, 5, seed=2)
    a = tl_degen.patch_directions(model, clean, corrupted, bases, "resid_mid.1", _metric,
                                  directions=np.array([1, 2]), positions=np.int64(3),
                                  progress=False)
    b = tl_degen.patch_directions(model, clean, corrupted, bases, "resid_mid.1", _metric,
                                  directions=[torch.tensor(1), [2]], positions=[3],
                                  progress=False)
    torch.testing.assert_close(a.values, b.values)
    assert a.positions == [3]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_patching_input_gets_a_specific_error(relu_setup, case):
    fn, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg):
        fn(*relu_setup)


def test_path_patch_refuses_a_pair_that_is_not_consecutive(relu_setup):
    model, _, bases = relu_setup
    graph = tl_degen.interaction_graph(model, M.random_tokens(30, 5, seed=4), bases,
                                       progress=False)
    with pytest.raises(tl_degen.SiteError, match="not a consecutive pair"):
        tl_degen.path_patch(model, M.random_tokens(6, 5), M.random_tokens(6, 5), graph,
                            "resid_pre.1", "resid_post.1:last", _metric)
    with pytest.raises(tl_degen.DataError, match=r"edge \(0, 999\) out of range"):
        tl_degen.path_patch(model, M.random_tokens(6, 5), M.random_tokens(6, 5), graph,
                            "resid_pre.1", "resid_mid.1", _metric, edges=[(0, 999)])


def test_results_round_trip_through_json(toy):
    import json

    model, _, bases, clean, corrupted, ld = toy
    res = tl_degen.patch_directions(model, clean, corrupted, bases["lib"], "resid_mid.0:last",
                                    ld, directions=[0, [1, 2]], progress=False)
    back = tl_degen.PatchResult.from_dict(json.loads(json.dumps(res.as_dict())))
    torch.testing.assert_close(back.per_example, res.per_example)
    assert back.labels == res.labels == ["0", "1..2"] and back.site == res.site
    attr = tl_degen.attribution_patch(model, clean, corrupted, bases["lib"], "resid_mid.0:last",
                                      ld, progress=False)
    back = tl_degen.AttributionResult.from_dict(json.loads(json.dumps(attr.as_dict())))
    assert back.total("resid_mid.0:last") == attr.total("resid_mid.0:last")
    assert "resid_mid.0:last" in repr(back) and "largest effects" in repr(res)


def test_a_metric_built_for_other_prompts_gets_a_clear_error(toy):
    model, _, bases, clean, corrupted, ld = toy
    with pytest.raises(tl_degen.DataError, match="must be built for exactly these prompts"):
        tl_degen.patch_directions(model, clean[:50], corrupted[:50], bases["lib"],
                                  "resid_mid.0:last", ld, directions=[1], progress=False)


def test_a_long_default_run_says_what_it_costs_and_the_top_directions_come_from_attribution(
        toy, monkeypatch):
    """Every direction alone, above the threshold, warns first with the estimate; explicit
    directions do not warn. ``AttributionResult.top`` lists the largest |attribution|
    first, and patching those alone gives the same effects as in the full run."""
    import warnings

    from tl_degen.patching import directions as D

    model, _, bases, clean, corrupted, ld = toy
    site = "resid_mid.0:last"
    monkeypatch.setattr(D, "LONG_RUN_SECONDS", 0.0)
    with pytest.warns(tl_degen.LongRunWarning, match=r"directions of resid_mid\.0:last alone"):
        full = tl_degen.patch_directions(model, clean, corrupted, bases["lib"], site, ld,
                                         progress=False)
    attribution = tl_degen.attribution_patch(model, clean, corrupted, bases["lib"], site, ld,
                                             progress=False)
    top = attribution.top(site, 5)
    per = attribution.per_direction(site).abs()
    assert per[top].tolist() == sorted(per.tolist(), reverse=True)[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error", tl_degen.LongRunWarning)
        some = tl_degen.patch_directions(model, clean, corrupted, bases["lib"], site, ld,
                                         directions=top, progress=False)
    torch.testing.assert_close(some.effects, full.effects[top], rtol=1e-9, atol=1e-12)
