"""tl_degen.sections.reader: every site of a batch, from the model's pass or through the sections'
formulas, equal to the model's own activations."""

from __future__ import annotations

import pytest
import torch

from tests import models as M
from tl_degen import memory
from tl_degen.adapters import get_adapter
from tl_degen.model_state import prepared
from tl_degen.sections.attention import AttentionFormula
from tl_degen.sections.mlp import LinearSection, PositionwiseSection
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.reader import BatchReader
from tl_degen.sections.recognise import may_have_closed_form
from tl_degen.sites import Site, parse_sites
from tl_degen.toy import modadd

MODADD_SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]


def _reader(adapter, batches, sites, closed_form=True):
    plans = [SectionPlan(adapter, a, b, alphas=[1.0], weights=[1.0], closed_form=closed_form)
             for a, b in zip(sites, sites[1:])]
    return BatchReader(adapter, batches, sites, plans)


def _modadd_float64():
    """The reference model in float64, its adapter, the reference sites and every 7th pair
    (skipped where the bridge has no attention closed form)."""
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    adapter = get_adapter(model)
    if not adapter.pattern_before_output:
        pytest.skip("a TransformerLens 3.x bridge has no attention closed form")
    return model, adapter, parse_sites(MODADD_SITES), modadd.tokens_for(modadd.all_pairs()[::7])


def _count_reads(monkeypatch, adapter) -> list:
    """From now on, every ``read_sites`` call as ``(batch size, site names)``."""
    reads = []
    original = type(adapter).read_sites

    def counted(self, b, s):
        reads.append((b.shape[0], [x.name for x in s]))
        return original(self, b, s)

    monkeypatch.setattr(type(adapter), "read_sites", counted)
    return reads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_by_formula_equals_the_model_on_every_architecture(arch, model):
    """The architectures without a normalisation (native_relu) read every site after the
    first by formula; the others from the model. Both equal the model's pass."""
    adapter = get_adapter(model)
    sites = parse_sites(M.mid_sites(arch))
    batches = [M.random_tokens(12, 6, seed=1), M.random_tokens(5, 6, seed=2),
               M.random_tokens(7, 4, seed=3)]
    with prepared(model, None):
        reader = _reader(adapter, batches, sites)
        for i, b in enumerate(batches):
            got, want = reader.all(i), adapter.read_sites(b, sites)
            assert [g.shape for g in got] == [w.shape for w in want]
            for g, w in zip(got, want):
                assert _rel(g, w) < 1e-12
    pattern = adapter.pattern_before_output
    assert reader._by_formula == {6: arch == "native_relu" and pattern,
                                  4: arch == "native_relu" and pattern}
    assert "6: " in repr(reader) and "kept" in repr(reader)


def test_modadd_reference_model_by_formula_reads_the_model_once_per_batch(monkeypatch):
    model, adapter, sites, tokens = _modadd_float64()
    batches = list(tokens.split(600))
    with prepared(model, None):
        want = [adapter.read_sites(b, sites) for b in batches]
        reads = _count_reads(monkeypatch, adapter)
        reader = _reader(adapter, batches, sites)
        got = [reader.all(i) for i in range(len(batches))]
        assert reader.all(1) is got[1]  # kept, not computed again
    for g_b, w_b in zip(got, want):
        for g, w in zip(g_b, w_b):
            assert _rel(g, w) < 1e-13
    # every site on the checked rows once, then the first site of each batch
    assert reads == [(256, MODADD_SITES)] + [(b.shape[0], ["resid_pre.0"]) for b in batches]


def test_a_formula_off_by_more_than_rounding_is_not_used(monkeypatch):
    """Recognition tolerates 1e-7; reading by formula needs 1e4·eps: a formula off by 1e-10
    (the same model otherwise) leaves every read to the model, exactly as it computes."""
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    adapter = get_adapter(model)
    sites = parse_sites(MODADD_SITES)
    tokens = modadd.tokens_for(modadd.all_pairs()[::17])
    for cls in (AttentionFormula, PositionwiseSection):
        monkeypatch.setattr(cls, "forward",
                            lambda self, x, tokens=None, forward=cls.forward:
                            None if (y := forward(self, x)) is None else y * (1 + 1e-10))
    with prepared(model, None):
        reader = _reader(adapter, [tokens], sites)
        got, want = reader.all(0), adapter.read_sites(tokens, sites)
        assert reader.plans[0].closed(tokens, got[0]) is not None or \
            not adapter.pattern_before_output  # recognised all the same
    assert reader._by_formula == {3: False}
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("closed_form", [True, False])
def test_nothing_kept_over_the_budget_and_reads_agree(monkeypatch, closed_form):
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    adapter = get_adapter(model)
    sites = parse_sites(MODADD_SITES)
    batches = list(modadd.tokens_for(modadd.all_pairs()[::13]).split(300))
    with prepared(model, None):
        want = [adapter.read_sites(b, sites) for b in batches]
        monkeypatch.setattr(memory, "MEMORY_BUDGET", 4 * 2**10)
        reader = _reader(adapter, batches, sites, closed_form=closed_form)
        for i in range(len(batches)):
            for k in range(len(sites)):
                assert _rel(reader.read(i, k), want[i][k]) < 1e-13
                assert reader.kept(i, k) is None
    assert "not kept" in repr(reader)
    formulas = closed_form and adapter.pattern_before_output
    assert reader._by_formula == {3: formulas}


def test_plans_must_match_the_sites():
    model = modadd.load_bridge(modadd.load_state_dict(), dtype=torch.float64)
    adapter = get_adapter(model)
    sites = parse_sites(MODADD_SITES)
    with pytest.raises(ValueError, match="4 sites need 3 plans, got 1"):
        BatchReader(adapter, [], sites, _reader(adapter, [], sites[:2]).plans)


@pytest.mark.parametrize("pair, no_norm, with_norm", [
    (("resid_pre.0", "resid_mid.0"), True, True),        # attention (norm_attention)
    (("resid_pre.0", "resid_mid.0:last"), True, True),
    (("resid_pre.0", "resid_mid.1"), False, False),      # across layers
    (("resid_mid.1", "resid_post.1:last"), True, True),  # MLP (after ln2)
    (("resid_mid.0", "resid_pre.1"), True, True),  # the same: resid_pre.1 = resid_post.0
    (("resid_pre.0", "resid_pre.1"), False, False),  # a whole block
    (("resid_mid.1", "mlp_post.1"), True, False),
    (("mlp_post.1", "resid_post.1"), True, False),
    (("resid_mid.0", "resid_post.1"), False, False),
    (("resid_post.1:last", "logits:last"), True, True),  # unembedding (after the final norm)
    (("resid_post.0", "logits"), False, False),
    (("resid_pre.0", "resid_post.0"), False, False),     # a whole block
])
def test_may_have_closed_form(pair, no_norm, with_norm):
    """The structure alone: the same table as recognise's branches, for a model without and
    with normalisation (native_relu and native_ln_gelu)."""
    a, b = (Site.parse(s) for s in pair)
    for arch, expected in (("native_relu", no_norm), ("native_ln_gelu", with_norm)):
        adapter = get_adapter(M.build(arch))
        assert may_have_closed_form(adapter, a, b) is expected, arch


def test_the_section_after_the_last_site_is_recognised_in_the_check_pass(monkeypatch):
    """``after``: the unembedding after ``resid_post.0:last`` is read with the checked sites
    and recognised there, so its recognition later reads nothing; it equals the section
    recognised on its own, and takes no part in the reader's decision."""
    model, adapter, sites, tokens = _modadd_float64()

    def plan(a, b):
        return SectionPlan(adapter, a, b, alphas=[1.0], weights=[1.0])

    with prepared(model, None):
        alone = plan(sites[2], sites[3]).closed(tokens, adapter.read_sites(tokens, sites[2:3])[0])
        reads = _count_reads(monkeypatch, adapter)
        after = plan(sites[2], sites[3])
        reader = BatchReader(adapter, [tokens], sites[:3],
                             [plan(a, b) for a, b in zip(sites[:2], sites[1:3])], after=after)
        reader.all(0)
        n_reads = len(reads)
        section = after.closed(tokens, reader.read(0, 2))  # cached: no read of its own
    assert reads[0] == (256, MODADD_SITES) and len(reads) == n_reads == 2
    assert isinstance(section, LinearSection) and isinstance(alone, LinearSection)
    assert torch.equal(section.J, alone.J)
    # an `after` that cannot have a closed form (logits → logits) is dropped: nothing read
    no_form = plan(sites[3], Site("logits", None, sites[3].positions))
    assert BatchReader(adapter, [tokens], sites, plans=None, after=no_form).after is None
