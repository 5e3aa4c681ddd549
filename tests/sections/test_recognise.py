"""Twin paths: every closed-form Jacobian Gram equals the autograd one (DESIGN.md §8), and
closed-form edges equal autograd edges."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections.attention import NormAttentionSection
from tl_degen.sections.base import Section
from tl_degen.sections.norm_mlp import NormMLPSection
from tl_degen.sections.plan import accumulate_jacobian_gram
from tl_degen.sections.recognise import recognise
from tl_degen.sections.rules import integration_rule
from tl_degen.sections.unembed import UnembedSection
from tl_degen.sites import Site
from tl_degen.stats import GramAccumulator
from tl_degen.toy import modadd

SECTIONS = [
    ("resid_pre.0", "resid_mid.0:last"),
    ("resid_pre.0", "resid_mid.0"),
    ("resid_pre.0", "resid_mid.0:0,2"),
    ("resid_mid.0:last", "resid_post.0:last"),
    ("resid_mid.0", "resid_post.0:1,2"),
    ("resid_post.0:last", "logits:last"),
    ("resid_post.0", "logits"),
    ("resid_mid.0:last", "mlp_post.0:last"),
    ("resid_mid.0", "mlp_post.0:0,2"),
    ("mlp_post.0:last", "resid_post.0:last"),
    ("mlp_post.0", "resid_post.0"),
]


@pytest.fixture(scope="module")
def modadd_model():
    return modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)


@pytest.mark.parametrize("rule", ["gradient", "trapezoid-3", "gauss-legendre-3",
                                  "gauss-legendre-1"])
@pytest.mark.parametrize("sites", SECTIONS, ids=["→".join(s) for s in SECTIONS])
@pytest.mark.parametrize("rotated_output", [True, False])
def test_closed_form_equals_autograd(modadd_model, sites, rule, rotated_output):
    """Attention with one evaluation point (``gradient``; ``gauss-legendre-1`` at α = ½) is
    summed in factored form, never forming the pullbacks; the rest from the pullbacks."""
    model, adapter = modadd_model, get_adapter(modadd_model)
    in_site, out_site = (Site.parse(s) for s in sites)
    tokens = modadd.tokens_for(modadd.all_pairs()[::211])
    name, _, n_alpha = rule.rpartition("-") if rule[-1].isdigit() else (rule, "", "0")
    alphas, weights = integration_rule(name, int(n_alpha) or None)
    g = torch.Generator().manual_seed(0)
    d_out = adapter.site_dim(out_site) + int(out_site.has_constant)
    out_C = (torch.randn(d_out, 7, generator=g, dtype=torch.float64)
             if rotated_output and out_site.kind != "logits" else None)
    results = []
    if in_site.kind == "resid_pre" and not adapter.pattern_before_output:
        pytest.skip("TransformerLens 3.x bridge: b_O cannot be pattern-weighted through hooks")
    with prepared(model, torch.float64):
        (x,) = adapter.read_sites(tokens, [in_site])
        assert recognise(adapter, tokens, in_site, out_site, x) is not None
        for closed in (True, False):
            acc = GramAccumulator(x.shape[-1])
            accumulate_jacobian_gram(adapter, tokens, in_site, out_site, x, out_C, acc,
                                     alphas=alphas, weights=weights, closed_form=closed)
            results.append(acc.value)
    assert (results[0] - results[1]).abs().max() <= 1e-12 * results[1].abs().max()


def test_closed_form_declines_where_it_does_not_apply(tokenizer_dir):
    """LayerNorm (GPT-2) and rotary/RMSNorm (Llama) sections fall back to autograd where no
    formula applies; attention after its LayerNorm (GPT-2) or RMSNorm with rotary positions
    and grouped-query heads (Llama) is known by its formula only; the MLP after ln2 (GELU;
    gated SiLU) and the final norm and unembedding of both have their closed form."""
    for arch in ("gpt2", "llama"):
        model = M.build(arch, tokenizer_dir)
        adapter = get_adapter(model)
        tokens = M.random_tokens(4, 5)
        for sites in (("resid_pre.1", "resid_mid.1"), ("resid_mid.1", "resid_post.1"),
                      ("resid_mid.1", "mlp_post.1"), ("mlp_post.1", "resid_post.1"),
                      ("resid_post.1", "logits")):
            in_site, out_site = (Site.parse(s) for s in sites)
            with prepared(model, torch.float64):
                (x,) = adapter.read_sites(tokens, [in_site])
                section = recognise(adapter, tokens, in_site, out_site, x)
            if sites[0] == "resid_pre.1":
                assert isinstance(section, NormAttentionSection) and not section.closed_form
                assert (section.weights.rotary is not None) == (arch == "llama")
                W = section.weights
                assert (W.H, W.H_kv) == ((4, 2) if arch == "llama" else (2, 2))
            elif sites[1] == "logits":
                assert isinstance(section, UnembedSection), (arch, section)
            elif sites == ("resid_mid.1", "resid_post.1"):
                assert isinstance(section, NormMLPSection) and section.closed_form, (arch,)
                assert section.mlp.gated == (arch == "llama")
            else:
                assert section is None, (arch, sites)


NORM_ARCHS = ["native_ln_gelu", "gpt2", "llama", "hooked_transformer"]


def _norm_attention_model(arch: str, tokenizer_dir):
    """``(model, adapter)`` of a test architecture whose attention follows a norm, its
    float32-rounding norms and softmax computing in float64; skips where it cannot run."""
    if arch == "hooked_transformer" and not M.HAS_HOOKED_TRANSFORMER:
        pytest.skip("HookedTransformer needs transformer_lens 3.x")
    model = M.exact_float64(M.build(arch, tokenizer_dir))
    adapter = get_adapter(model)
    if not adapter.pattern_before_output:
        pytest.skip("TransformerLens 3.x bridge: b_O cannot be pattern-weighted through hooks")
    return model, adapter


@pytest.mark.parametrize("arch", NORM_ARCHS)
def test_attention_after_a_norm_by_its_formula_equals_the_model(arch, tokenizer_dir):
    """Attention after a LayerNorm or RMSNorm (Llama: rotary positions, two query heads per
    key/value head), differentiated through the section's formula: its output, Jacobian
    Gram (exact and integrated) and edges (forward mode) equal those of autograd through the
    model, at every position and at the last (Llama's norms and softmax computing in
    float64, :func:`tests.models.exact_float64`)."""
    import tl_degen

    model, adapter = _norm_attention_model(arch, tokenizer_dir)
    tokens = M.random_tokens(10, 6)
    for out in ("resid_mid.1", "resid_mid.1:last"):
        in_site, out_site = Site.parse("resid_pre.1"), Site.parse(out)
        with prepared(model, torch.float64):
            x, y = adapter.read_sites(tokens, [in_site, out_site])
            section = recognise(adapter, tokens, in_site, out_site, x)
            assert isinstance(section, NormAttentionSection)
            torch.testing.assert_close(section.forward(x), y, rtol=0, atol=1e-12)
            out_C = torch.randn(y.shape[-1], 5, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
            for alphas, weights in ([[1.0], [1.0]], integration_rule("gauss-legendre", 2)):
                grams = []
                for closed in (True, False):
                    acc = GramAccumulator(x.shape[-1])
                    accumulate_jacobian_gram(adapter, tokens, in_site, out_site, x, out_C, acc,
                                             alphas=alphas, weights=weights,
                                             closed_form=closed)
                    grams.append(acc.value)
                err = (grams[0] - grams[1]).abs().max() / grams[1].abs().max()
                assert err <= 1e-10, (out, alphas, float(err))
        sites = ["resid_pre.1", out, "resid_post.1:last"]
        bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
        graphs = [tl_degen.interaction_graph(model, tokens, bases, closed_form=closed,
                                             route="forward", progress=False)
                  for closed in (True, False)]
        routes = graphs[0].config["edge_routes"]
        assert routes[f"resid_pre.1->{out}"] == "forward (section formula)", routes
        for pair, E in graphs[1].edges.items():
            err = (graphs[0].edges[pair] - E).abs().max() / E.abs().max()
            assert err <= 1e-10, (pair, float(err))


@pytest.mark.parametrize("arch", NORM_ARCHS)
def test_attention_edges_with_tangents_written_out_equal_autograd(arch, tokenizer_dir):
    """The attention formula's forward-route edges with their tangents written out (rank-one
    projections, the pattern's tangent, W_O C in one product) equal forward-mode autograd
    through the same formula to 1e-12: every position, the last, and two of them; one and
    two integration points; raw and rotated outputs; with gradients on or off."""
    model, adapter = _norm_attention_model(arch, tokenizer_dir)
    tokens = M.random_tokens(10, 6)
    g = torch.Generator().manual_seed(1)
    for out in ("resid_mid.1", "resid_mid.1:last", "resid_mid.1:1,4"):
        in_site, out_site = Site.parse("resid_pre.1"), Site.parse(out)
        with prepared(model, torch.float64):
            x, y = adapter.read_sites(tokens, [in_site, out_site])
            section = recognise(adapter, tokens, in_site, out_site, x, y)
            assert isinstance(section, NormAttentionSection)
            C_pinv = torch.randn(7, x.shape[-1], generator=g, dtype=torch.float64)
            h = torch.randn(*x.shape[:2], 7, generator=g, dtype=torch.float64)
            for rule in ([[1.0], [1.0]], integration_rule("gauss-legendre", 2)):
                for out_C in (None, torch.randn(y.shape[-1], 5, generator=g,
                                                dtype=torch.float64)):
                    E = section.edge_squares(x.requires_grad_(True), h, C_pinv, out_C, *rule)
                    F = Section.edge_squares(section, x.detach(), h, C_pinv, out_C, *rule,
                                             route="forward")
                    assert not E.requires_grad
                    err = (E - F).abs().max() / F.abs().max()
                    assert err <= 1e-12, (out, rule, float(err))


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rotary_attention_of_a_hooked_transformer(adjacent, rotary_dim):
    """A HookedTransformer with RMSNorm, rotary positions (halves or adjacent pairs, the
    whole head or half of it) and one key/value head for two query heads: the formula's
    output equals the model's, and its Jacobian Gram equals autograd's through the model to
    1e-10, at every position and at the last."""
    if not M.HAS_HOOKED_TRANSFORMER:
        pytest.skip("HookedTransformer needs transformer_lens 3.x")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=16, n_heads=2, d_head=8, d_mlp=24, n_layers=2, d_vocab=M.VOCAB, n_ctx=M.N_CTX,
        act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=rotary_dim,
        rotary_adjacent_pairs=adjacent, n_key_value_heads=1, dtype=torch.float64)
    model = M.randomise(HookedTransformer(cfg)).eval()
    for block in model.blocks:  # a gated MLP's b_in is not supported on HookedTransformer
        block.mlp.b_in.data.zero_()
    adapter = get_adapter(model)
    tokens = M.random_tokens(10, 6)
    out_C = torch.randn(17, 5, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    for out in ("resid_mid.1", "resid_mid.1:last"):
        in_site, out_site = Site.parse("resid_pre.1"), Site.parse(out)
        x, y = adapter.read_sites(tokens, [in_site, out_site])
        section = recognise(adapter, tokens, in_site, out_site, x)
        assert isinstance(section, NormAttentionSection), out
        assert section.weights.rotary.adjacent == adjacent
        assert section.weights.rotary.cos.shape == (6, rotary_dim)
        torch.testing.assert_close(section.forward(x), y, rtol=0, atol=1e-12)
        grams = []
        for closed in (True, False):
            acc = GramAccumulator(x.shape[-1])
            accumulate_jacobian_gram(adapter, tokens, in_site, out_site, x, out_C, acc,
                                     alphas=[1.0], weights=[1.0], closed_form=closed)
            grams.append(acc.value)
        assert (grams[0] - grams[1]).abs().max() <= 1e-10 * grams[1].abs().max()


NORM_MLP_ARCHS = ["native_ln_gelu", "gpt2", "llama", "hooked_transformer"]


@pytest.mark.parametrize("arch", NORM_MLP_ARCHS)
def test_mlp_after_a_norm_in_closed_form_equals_autograd(arch, tokenizer_dir):
    """ln2 (LayerNorm, RMSNorm) and the MLP (GELU, gated SiLU) in closed form: the forward
    pass equals the model's; the Jacobian Gram, edges and pullbacks equal autograd through
    the section's forward pass to 1e-12 at every integration rule, raw and rotated outputs;
    the Gram equals autograd through the model (Llama's RMSNorm runs in float32 inside
    Hugging Face, so there the model itself is exact to ~1e-7 only)."""
    if arch == "hooked_transformer" and not M.HAS_HOOKED_TRANSFORMER:
        pytest.skip("HookedTransformer needs transformer_lens 3.x")
    model = M.build(arch, tokenizer_dir)
    adapter = get_adapter(model)
    tokens = M.random_tokens(10, 6)
    g = torch.Generator().manual_seed(0)
    for out in ("resid_post.1", "resid_post.1:last"):
        in_site, out_site = Site.parse("resid_mid.1"), Site.parse(out)
        with prepared(model, torch.float64):
            x, y = adapter.read_sites(tokens, [in_site, out_site])
            section = recognise(adapter, tokens, in_site, out_site, x)
            assert isinstance(section, NormMLPSection) and section.closed_form
            model_tol = 1e-6 if arch == "llama" else 1e-12
            err = (section.forward_rows(x) - y[:, section.out_rows]).abs().max()
            assert err <= model_tol * y.abs().max()
            C_pinv = torch.randn(7, x.shape[-1], generator=g, dtype=torch.float64)
            h = torch.randn(*x.shape[:2], 7, generator=g, dtype=torch.float64)
            rotated = torch.randn(y.shape[-1], 5, generator=g, dtype=torch.float64)
            for rule in ([[1.0], [1.0]], integration_rule("gauss-legendre", 2),
                         integration_rule("trapezoid", 3)):
                for out_C in (rotated, None):
                    grams = []
                    for add in (section.add_jacobian_gram,
                                lambda *a: Section.add_jacobian_gram(section, *a)):
                        acc = GramAccumulator(x.shape[-1])
                        for part in (x[:4], x[4:]):  # two batches: summed, then finished
                            add(part, out_C, acc, *rule)
                        grams.append(acc.value)
                    assert (grams[0] - grams[1]).abs().max() <= 1e-12 * grams[1].abs().max()
                    E = section.edge_squares(x, h, C_pinv, out_C, *rule)
                    F = Section.edge_squares(section, x, h, C_pinv, out_C, *rule,
                                             route="forward")
                    assert (E - F).abs().max() <= 1e-12 * F.abs().max(), (out, rule)
                    k = y.shape[-1] if out_C is None else out_C.shape[1]
                    dense = []
                    for source in (section.pullbacks, lambda *a: Section.pullbacks(section, *a)):
                        J = x.new_zeros(x.shape[0], section.n_out_pos, *x.shape[1:], k)
                        for pb in source(x, out_C, *rule):
                            for i, r in enumerate(pb.in_rows):
                                view = J[pb.samples, pb.t, r]  # [b, d_in, k], a view
                                view[..., pb.dirs] += pb.g[:, i]
                        dense.append(J)
                    assert (dense[0] - dense[1]).abs().max() <= 1e-12 * dense[1].abs().max()
                    assert dense[1].abs().max() > 0
            acc = GramAccumulator(x.shape[-1])
            accumulate_jacobian_gram(adapter, tokens, in_site, out_site, x, rotated, acc,
                                     alphas=[1.0], weights=[1.0], closed_form=False)
            mine = GramAccumulator(x.shape[-1])
            section.add_jacobian_gram(x, rotated, mine, [1.0], [1.0])
            err = (mine.value - acc.value).abs().max() / acc.value.abs().max()
            assert err <= (1e-6 if arch == "llama" else 1e-12), float(err)


EDGE_CASES = {
    "mlp-hidden": (["resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last", "logits:last"],
                   "gradient", 97),
    "attention-last": (["resid_pre.0", "resid_mid.0:last", "resid_post.0:last"], "gradient", 97),
    "attention-last-trapezoid": (["resid_pre.0", "resid_mid.0:last"], "trapezoid", 197),
    "attention-all": (["resid_pre.0", "resid_mid.0"], "gradient", 397),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if c in ("attention-all", "attention-last-trapezoid")
    else c for c in EDGE_CASES])
def test_closed_form_edges_equal_autograd_edges(modadd_model, case):
    """Graphs through the MLP-hidden site and through attention (one output position or all),
    once with closed forms and once without, at one and at several integration points."""
    import tl_degen

    sites, integration, step = EDGE_CASES[case]
    tokens = modadd.tokens_for(modadd.all_pairs()[::step])
    if "resid_pre.0" in sites and not get_adapter(modadd_model).pattern_before_output:
        pytest.skip("TransformerLens 3.x bridge: b_O cannot be pattern-weighted through hooks")
    graphs = []
    for closed in (True, False):
        bases = tl_degen.fit_bases(modadd_model, tokens, sites, closed_form=closed,
                                   integration=integration, n_alpha=3, progress=False)
        graphs.append(tl_degen.interaction_graph(modadd_model, tokens, bases,
                                                 closed_form=closed, integration=integration,
                                                 n_alpha=3, progress=False))
    for pair, E in graphs[0].edges.items():
        F = graphs[1].edges[pair]
        assert E.shape == F.shape
        assert (E - F).abs().max() <= 1e-8 * F.abs().max(), pair


def test_closed_form_refuses_a_wrong_derivative():
    """A model whose attention scale differs from what the closed form assumes must fall
    back to autograd (the VJP check), and both paths must then agree."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=16, n_heads=2, d_head=8, d_mlp=24, n_layers=1,
                                  d_vocab=M.VOCAB, n_ctx=M.N_CTX, act_fn="relu",
                                  normalization_type=None, use_attn_scale=False)
    model = M.randomise(TransformerBridge.boot_native(cfg), scale=1.0).double().eval()
    tokens = M.random_tokens(8, 5)
    sites = ["resid_pre.0", "resid_mid.0:last", "logits:last"]
    a = tl_degen.fit_bases(model, tokens, sites, progress=False)
    b = tl_degen.fit_bases(model, tokens, sites, progress=False, closed_form=False)
    lam_a, lam_b = a["resid_pre.0"].eigenvalues, b["resid_pre.0"].eigenvalues
    assert torch.allclose(lam_a, lam_b, rtol=1e-8, atol=1e-10 * lam_b.max())


def test_derivative_is_checked_once_per_kind_of_section(monkeypatch, tokenizer_dir):
    """Every layer's section is checked against the model's forward pass; the vector-Jacobian
    product against autograd runs once per kind of section (class, sites' kinds and
    positions, prompt length, dtype) on one adapter, and a failed check is never cached."""
    from tl_degen.sections import recognise as R

    calls = []
    real = R._vjp_agrees

    def counting(section, *args, **kwargs):
        calls.append(section.in_site.name)
        return real(section, *args, **kwargs)

    monkeypatch.setattr(R, "_vjp_agrees", counting)
    model = M.build("gpt2", tokenizer_dir)
    adapter = get_adapter(model)
    tokens = M.random_tokens(4, 5)
    pairs = [("resid_pre.0", "resid_mid.0"), ("resid_pre.1", "resid_mid.1"),
             ("resid_mid.0", "resid_pre.1"), ("resid_mid.1", "resid_post.1"),
             ("resid_mid.1", "resid_post.1:last")]
    with prepared(model, torch.float64):
        for a, b in pairs:
            in_site, out_site = Site.parse(a), Site.parse(b)
            (x,) = adapter.read_sites(tokens, [in_site])
            assert recognise(adapter, tokens, in_site, out_site, x) is not None, (a, b)
    # attention once, the MLP into every position once, into the last position once
    assert calls == ["resid_pre.0", "resid_mid.0", "resid_mid.1"]
    assert len(adapter.checked_derivatives) == 3
    calls.clear()
    monkeypatch.setattr(R, "_vjp_agrees", lambda *a, **k: calls.append(1) and False)
    fresh = get_adapter(model)
    with prepared(model, torch.float64):
        for a, b in pairs[:2]:
            in_site, out_site = Site.parse(a), Site.parse(b)
            (x,) = fresh.read_sites(tokens, [in_site])
            assert recognise(fresh, tokens, in_site, out_site, x) is None
    assert len(calls) == 2 and not fresh.checked_derivatives  # each layer checked, refused
