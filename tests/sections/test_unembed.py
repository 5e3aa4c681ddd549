"""The output end (DESIGN.md §4 steps 4 and 8, :mod:`tl_degen.sections.unembed`): the final
norm and unembedding in closed form against autograd, and the logits of a large vocabulary kept
in their factor space against the full ``V × V`` statistics."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections import ModelSection, integration_rule
from tl_degen.sections import unembed as U
from tl_degen.sections.recognise import recognise
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _gram(section, x, C, rule, tokens):
    acc = GramAccumulator(x.shape[-1])
    section.add_jacobian_gram(x, C, acc, rule.alphas, rule.weights, tokens)
    return acc.value * acc.count


@pytest.mark.parametrize("arch", ["native_ln_gelu", "gpt2", "llama"])
@pytest.mark.parametrize("positions", ["", ":last"])
@pytest.mark.parametrize("vocab_block", [U.VOCAB_BLOCK, 7])
def test_final_norm_and_unembedding_in_closed_form_equal_autograd(arch, positions, vocab_block,
                                                                  tokenizer_dir, monkeypatch):
    """LayerNorm (with and without a bias in the unembedding) and RMSNorm: the section's
    forward pass, its Jacobian Gram into the raw logits and into a basis, and its edges equal
    autograd through the model to 1e-10, under the gradient rule and a 3-point rule; the
    unembedding met by the basis in one block of the vocabulary or in blocks of 7."""
    monkeypatch.setattr(U, "VOCAB_BLOCK", vocab_block)
    model = M.build(arch, tokenizer_dir)
    if arch == "llama":
        M.exact_float64(model)
    adapter = get_adapter(model)
    tokens = M.random_tokens(6, 5)
    a, b = Site.parse("resid_post.1" + positions), Site.parse("logits" + positions)
    gen = torch.Generator().manual_seed(0)
    with prepared(model, torch.float64):
        x, y = adapter.read_sites(tokens, [a, b])
        section = recognise(adapter, tokens, a, b, x, y)
        assert isinstance(section, U.UnembedSection), arch
        reference = ModelSection(adapter, a, b, tokens.shape[1])
        assert _rel(section.forward(x, tokens), y) < 1e-12
        C_out = torch.randn(y.shape[-1], 3, generator=gen, dtype=torch.float64)
        C_in = torch.randn(x.shape[-1], 4, generator=gen, dtype=torch.float64)
        C_pinv = torch.linalg.pinv(C_in)
        h = x @ C_in
        for rule in (integration_rule("gradient", None), integration_rule("trapezoid", 3)):
            for out in (None, C_out):
                want = _gram(reference, x, out, rule, tokens)
                assert _rel(_gram(section, x, out, rule, tokens), want) < 1e-10
                edges = section.edge_squares(h @ C_pinv, h, C_pinv, out, rule.alphas,
                                             rule.weights, tokens)
                ref = reference.edge_squares(h @ C_pinv, h, C_pinv, out, rule.alphas,
                                             rule.weights, tokens, route="backward")
                assert edges.shape == ref.shape and _rel(edges, ref) < 1e-10


def test_llama_rms_norm_in_float32_is_still_recognised(tokenizer_dir):
    """Unpatched, the Llama model's final RMSNorm rounds to float32 (the model's logits miss
    the float64 formula by ~1e-7 of their scale): the unembedding is still recognised, and a
    wrong eps is not."""
    model = M.build("llama", tokenizer_dir)
    adapter = get_adapter(model)
    tokens = M.random_tokens(4, 5)
    a, b = Site.parse("resid_post.1"), Site.parse("logits")
    with prepared(model, torch.float64):
        x, y = adapter.read_sites(tokens, [a, b])
        assert isinstance(recognise(adapter, tokens, a, b, x, y), U.UnembedSection)
        ln = model.ln_final._original_component
        ln.variance_epsilon, eps = 1e-5, ln.variance_epsilon
        try:
            wrong = adapter.read_sites(tokens, [b])[0]
        finally:
            ln.variance_epsilon = eps
        assert recognise(adapter, tokens, a, b, x, wrong) is None


def test_logit_factor_spans_the_logits():
    """``[W_U; b_U]ᵀ = Q R`` with orthonormal ``Q``; the logits equal their coordinates read
    back (``y Q Qᵀ = y``); small vocabularies keep the identity basis; a GPT-2-small-shaped
    vocabulary has a ``d_model + 1`` factor space."""
    model = M.build("native_ln_gelu")
    adapter = get_adapter(model)
    assert U.logit_factor(adapter) is None  # 40 tokens: one node per token
    site = Site.parse("logits:last")
    assert U.statistics_dim(adapter, site) == M.VOCAB
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(U, "FACTOR_VOCAB", 0)
        factor = U.logit_factor(adapter)
        assert factor.r == 17 and U.statistics_dim(adapter, site) == 17
        B = U.unembedding(adapter)
        torch.testing.assert_close(factor.Q @ factor.R, B.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(factor.Q.T @ factor.Q, torch.eye(17, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        with prepared(model, torch.float64):
            y = adapter.read_sites(M.random_tokens(3, 5), [site])[0]
        torch.testing.assert_close(factor.coordinates(y) @ factor.Q.T, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["well conditioned", "zero row", "ill conditioned"])
def test_left_svd_by_the_gram_equals_the_svd(case):
    """The factor's SVD through the ``[d1, d1]`` Gram equals LAPACK's SVD: the same singular
    values (the zero one of an absent ``b_U`` dropped, as the factor's cut drops it),
    ``Bᵀ = U S Vh``, ``U`` orthonormal to 1e-12; where small singular values make the Gram
    imprecise, the SVD itself is returned."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(9, 300, generator=g, dtype=torch.float64)
    if case == "zero row":
        B[-1] = 0.0
    if case == "ill conditioned":
        B[-1] = B[-2] + 1e-7 * B[-1]  # a singular value ~1e-8 of the largest
    U_, S_, Vh_ = U._left_svd(B)
    ref = torch.linalg.svd(B.T, full_matrices=False)
    r = 8 if case == "zero row" else 9
    assert S_.shape == (r,)
    torch.testing.assert_close(S_, ref.S[:r], rtol=1e-12, atol=0)
    torch.testing.assert_close((U_ * S_) @ Vh_, B.T, rtol=0, atol=1e-12 * float(B.abs().max()))
    torch.testing.assert_close(U_.T @ U_, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    if case == "ill conditioned":  # the SVD's own factors
        assert torch.equal(U_, ref.U) and torch.equal(Vh_, ref.Vh)


def test_factor_space_fit_equals_the_full_vocabulary_fit(monkeypatch, tmp_path):
    """The logits kept in their factor space (``FACTOR_VOCAB`` lowered below the test
    vocabulary) against one node per token: the same bases before the logits, to 1e-10; the
    logits basis is ``C = Q`` with ``Q gram Qᵀ`` the full vocabulary Gram and the same mean;
    the graph's edges into the logits keep each input direction's total; save/load
    round-trips the factor basis."""
    model = M.build("native_ln_gelu")
    tokens = M.random_tokens(48, 5)
    sites = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "logits:last"]
    kw = dict(progress=False, dtype=torch.float64)
    full = tl_degen.fit_bases(model, tokens, sites, **kw)
    g_full = tl_degen.interaction_graph(model, tokens, full, progress=False)
    monkeypatch.setattr(U, "FACTOR_VOCAB", 0)
    fac = tl_degen.fit_bases(model, tokens, sites, **kw)
    g_fac = tl_degen.interaction_graph(model, tokens, fac, progress=False)
    for s in sites[:-1]:
        assert full[s].k == fac[s].k
        assert _rel(fac[s].eigenvalues, full[s].eigenvalues) < 1e-10, s
        assert _rel(fac[s].C.abs(), full[s].C.abs()) < 1e-8, s
    lf, lv = fac["logits:last"], full["logits:last"]
    assert lf.C.shape == (M.VOCAB, 17) and lv.C.shape == (M.VOCAB, M.VOCAB)
    assert _rel(lf.C @ lf.gram @ lf.C_pinv, lv.gram) < 1e-10
    assert _rel(lf.mean, lv.mean) < 1e-10
    last = ("resid_post.1:last", "logits:last")
    ef, ev = g_fac.edge(*last), g_full.edge(*last)
    assert ef.shape[0] == 17 and ev.shape[0] == M.VOCAB
    assert _rel(ef.sum(0), ev.sum(0)) < 1e-10
    fac.save(tmp_path / "bases")
    reloaded = type(fac).load(tmp_path / "bases", model)["logits:last"]
    for name in ("C", "C_pinv", "gram", "mean", "eigenvalues"):
        torch.testing.assert_close(getattr(reloaded, name), getattr(lf, name), rtol=0, atol=0)


def test_gpt2_small_vocabulary_ends_in_the_logits():
    """A GPT-2-shaped model with the full 50257-token vocabulary: a fit ending in
    ``logits:last`` keeps its statistics in ``d_model + 1`` coordinates and passes the memory
    check under a budget the vocabulary Gram (50257², 20 GB) would break; with probes asked
    for, the Jacobian Gram into the logits is still exact (the closed form)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64, n_layers=1,
                                  d_vocab=50257, n_ctx=8, act_fn="gelu",
                                  normalization_type="LN")
    model = TransformerBridge.boot_native(cfg)
    M.randomise(model, 0)
    model.eval()
    tokens = torch.randint(0, 50257, (24, 6), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_DEGEN_MEMORY_BUDGET", "2G")
        bases = tl_degen.fit_bases(model, tokens, ["resid_pre.0", "resid_post.0:last",
                                                   "logits:last"], n_probes=8,
                                     progress=False)
    logits = bases["logits:last"]
    assert logits.C.shape == (50257, 33) and logits.gram.shape == (33, 33)
    assert bases["resid_post.0:last"].jacobian_gram_error == 0.0
