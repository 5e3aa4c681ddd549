"""Batch sizes from a memory budget (tl_degen.memory)."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tl_degen import TLDegenError, memory
from tl_degen.adapters import get_adapter
from tl_degen.fitting import token_batches
from tl_degen.toy import modadd


@pytest.fixture
def budget(monkeypatch):
    def set_budget(value):
        monkeypatch.setattr(memory, "MEMORY_BUDGET", value)

    monkeypatch.delenv("TL_DEGEN_MEMORY_BUDGET", raising=False)
    return set_budget


def test_small_budget_gives_batches_that_fit_it(budget):
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1000])
    per = memory.bytes_per_sequence(model, n_pos=3)
    # closed form: 8 bytes × 3 positions × (layers × (16·128 + 4·512 + 3·4·3) + 2·114)
    assert per == 8 * 3 * (16 * 128 + 4 * 512 + 3 * 4 * 3 + 2 * 114)
    budget(7 * per + per // 2)
    batches = token_batches(tokens, None, get_adapter(model))
    assert [b.shape[0] for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert sum(b.shape[0] for b in batches) == 1000 and len(batches) == 143
    budget(10**12)  # everything in one batch (at most MAX_BATCH sequences)
    assert len(token_batches(tokens, None, get_adapter(model))) == 1
    budget(1)  # smaller than one sequence: one sequence per batch, never zero
    assert memory.auto_batch_size(model, 3) == 1


def test_fit_with_a_small_budget_equals_one_batch(budget):
    model = modadd.load_bridge(dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:200])
    sites = ["resid_mid.0:last", "resid_post.0:last", "logits:last"]
    budget(30 * memory.bytes_per_sequence(model, 3))
    small = tl_degen.fit_bases(model, tokens, sites, progress=False)
    whole = tl_degen.fit_bases(model, tokens, sites, batch_size=200, progress=False)
    for s in sites[:-1]:
        lam = whole[s].eigenvalues
        torch.testing.assert_close(small[s].eigenvalues, lam, rtol=0,
                                   atol=1e-12 * float(lam.max()))


def test_budget_from_the_environment(budget, monkeypatch):
    budget(None)
    monkeypatch.setenv("TL_DEGEN_MEMORY_BUDGET", "3M")
    assert memory.memory_budget() == 3 * 2**20
    monkeypatch.setenv("TL_DEGEN_MEMORY_BUDGET", "1.5G")
    assert memory.memory_budget() == int(1.5 * 2**30)
    monkeypatch.setenv("TL_DEGEN_MEMORY_BUDGET", "lots")
    with pytest.raises(TLDegenError, match="not a size"):
        memory.memory_budget()
    monkeypatch.delenv("TL_DEGEN_MEMORY_BUDGET")
    assert 0 < memory.memory_budget() <= 4 * 2**30
    budget(-5)
    with pytest.raises(TLDegenError, match="MEMORY_BUDGET must be above 0"):
        memory.memory_budget()
    budget(float("nan"))
    with pytest.raises(TLDegenError, match="MEMORY_BUDGET must be a finite number"):
        memory.memory_budget()


def test_work_that_cannot_fit_the_budget_stops_before_it_starts(budget, monkeypatch):
    model = modadd.load_bridge(dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:50])
    sites = ["resid_mid.0:last", "resid_post.0:last", "logits:last"]
    per = memory.bytes_per_sequence(model, 3)
    # the statistics the fit keeps: 3·d² floats per site and (6 + probe groups)·d² of the
    # largest, d = 129, 129 and 114 (the constant coordinate included; logits have none)
    stats = 8 * (3 * (129**2 + 129**2 + 114**2) + 6 * 129**2)
    assert memory.statistics_bytes([129, 129, 114]) == stats
    assert memory.statistics_bytes([129, 129, 114], n_groups=4) == stats + 8 * 4 * 129**2

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the budget was checked")

    adapter_cls = type(get_adapter(model))
    monkeypatch.setattr(adapter_cls, "read_sites", no_forward)
    budget(per - 1)  # not even one sequence
    with pytest.raises(memory.MemoryBudgetError, match="one sequence of 3 tokens") as err:
        tl_degen.fit_bases(model, tokens, sites, progress=False)
    assert f"MEMORY_BUDGET = {per} " in str(err.value)  # what would have been enough
    with pytest.raises(tl_degen.MemoryBudgetError):
        token_batches(tokens, None, get_adapter(model))
    budget(stats + per - 1)  # one sequence fits, not with the fit's statistics
    token_batches(tokens, None, get_adapter(model))
    with pytest.raises(TLDegenError, match=r"statistics of 3 sites \(the largest of dimension "
                       r"129\).*MEMORY_BUDGET = " + str(stats + per)):
        tl_degen.fit_bases(model, tokens, sites, progress=False)
    monkeypatch.undo()
    budget(stats + per)  # exactly enough: the fit runs (batches from the budget)
    small = tl_degen.fit_bases(model, tokens, sites, progress=False)
    budget(1)
    whole = tl_degen.fit_bases(model, tokens, sites, batch_size=50, progress=False)  # explicit
    for s in sites[:-1]:
        lam = whole[s].eigenvalues
        torch.testing.assert_close(small[s].eigenvalues, lam, rtol=0,
                                   atol=1e-12 * float(lam.max()))


def test_float32_passes_take_half_the_bytes_per_sequence(budget):
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:100])
    per64 = memory.bytes_per_sequence(model, 3)
    assert memory.bytes_per_sequence(model, 3, itemsize=4) * 2 == per64
    budget(10 * per64)
    assert token_batches(tokens, None, get_adapter(model))[0].shape[0] == 10
    assert token_batches(tokens, None, get_adapter(model), itemsize=4)[0].shape[0] == 20
