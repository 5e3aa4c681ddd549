"""The architecture record: one reading of the model config, the same for every module."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from tests import models as M
from tl_degen.adapters import Architecture, get_adapter
from tl_degen.adapters.architecture import config_dtype
from tl_degen.toy import modadd

# the configs tests/models.py builds (d_model 16, two layers, VOCAB tokens, N_CTX positions)
EXPECTED = {
    "native_relu": dict(normalization=None, act_fn="relu", gated_mlp=False, parallel=False,
                        positional_embedding="standard", n_heads=2, n_key_value_heads=2,
                        d_head=8, native=True),
    "native_ln_gelu": dict(normalization="LN", act_fn="gelu", gated_mlp=False, parallel=False,
                           positional_embedding="standard", n_heads=2, n_key_value_heads=2,
                           d_head=8, native=True),
    "gpt2": dict(normalization="LN", act_fn="gelu_new", gated_mlp=False, parallel=False,
                 positional_embedding="standard", n_heads=2, n_key_value_heads=2, d_head=8,
                 native=False),
    "neox": dict(normalization="LN", act_fn="gelu", gated_mlp=False, parallel=True,
                 positional_embedding="rotary", n_heads=2, n_key_value_heads=2, d_head=8,
                 native=False),
    "llama": dict(normalization="RMS", act_fn="silu", gated_mlp=True, parallel=False,
                  positional_embedding="rotary", n_heads=4, n_key_value_heads=2, d_head=4,
                  native=False),
    "hooked_transformer": dict(normalization="LN", act_fn="gelu", gated_mlp=False,
                               parallel=False, positional_embedding="standard", n_heads=2,
                               n_key_value_heads=2, d_head=8),
}


def test_record_of_each_test_architecture(arch, model):
    rec = Architecture.from_model(model)
    want = EXPECTED[arch]
    got = {k: getattr(rec, k) for k in want}
    assert got == want
    assert (rec.n_layers, rec.d_model, rec.d_mlp) == (2, 16, 24)
    assert (rec.d_vocab, rec.d_vocab_out, rec.n_ctx) == (M.VOCAB, M.VOCAB, M.N_CTX)
    assert rec.causal and rec.attn_scores_soft_cap is None
    assert rec.output_logits_soft_cap is None
    assert rec.attn_scale == pytest.approx(math.sqrt(want["d_head"]))
    assert rec.dtype == torch.float64  # tests/models.py casts every model to float64
    assert rec.eps is not None and 0 < rec.eps < 1e-3
    assert rec.rotary == (want["positional_embedding"] == "rotary")
    assert rec.no_norm == (want["normalization"] is None)
    assert rec.grouped_query == (arch == "llama")


def test_adapter_reads_the_record(arch, model):
    """``Adapter.arch`` is built once, equals ``from_model``, and the adapter's old attributes
    are its fields."""
    adapter = get_adapter(model)
    assert adapter.arch == Architecture.from_model(model)
    for name in ("n_layers", "d_model", "d_mlp", "n_heads", "n_ctx", "d_vocab", "d_vocab_out",
                 "parallel"):
        assert getattr(adapter, name) == getattr(adapter.arch, name), name
    assert adapter.signature()["parallel"] == EXPECTED[arch]["parallel"]


def test_modadd_record():
    rec = get_adapter(modadd.load_bridge(modadd.load_state_dict())).arch
    assert rec.normalization is None and rec.no_norm
    assert rec.act_fn == "relu" and not rec.gated_mlp and not rec.parallel
    assert rec.attn_scale == pytest.approx(math.sqrt(32)) and rec.d_head == 32
    assert rec.positional_embedding == "standard" and not rec.rotary
    assert rec.native and rec.causal and not rec.grouped_query


def _native(n_layers: int = 1, **cfg):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    base = dict(d_model=16, n_heads=2, d_head=8, d_mlp=24, n_layers=n_layers, d_vocab=M.VOCAB,
                n_ctx=M.N_CTX, act_fn="relu", normalization_type=None)
    return M.randomise(TransformerBridge.boot_native(TransformerBridgeConfig(**{**base, **cfg})))


def test_use_attn_scale_false_gives_one():
    """The convention (a HookedTransformer's): ``use_attn_scale=False`` means unscaled scores.
    TransformerLens 4's native attention ignores the flag and divides by ``sqrt(d_head)``
    anyway, so this is the record's reading of the config, not checked on the pattern."""
    assert Architecture.from_model(_native(use_attn_scale=False)).attn_scale == 1.0
    assert Architecture.from_model(_native(use_attn_scale=False, attn_scale=3.0)).attn_scale == 1.0


@pytest.mark.parametrize("cfg, divisor", [({}, math.sqrt(8)), ({"attn_scale": 3.0}, 3.0)])
def test_attn_scale_is_the_divisor_of_the_scores(cfg, divisor):
    """The record's ``attn_scale`` is what the model divides ``q·k`` by (checked on the
    pattern: a bridge's ``hook_attn_scores`` is not the raw scores)."""
    model = _native(**cfg).eval()
    rec = Architecture.from_model(model)
    assert rec.attn_scale == pytest.approx(divisor)
    seen = {}

    def keep(t, hook, name):
        seen[name] = t.detach()

    hooks = [(f"blocks.0.attn.hook_{n}", lambda t, hook, n=n: keep(t, hook, n))
             for n in ("q", "k", "pattern")]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(M.random_tokens(2, 5))
    q, k = seen["q"], seen["k"]  # [batch, pos, head, d_head]
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / rec.attn_scale
    future = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
    assert torch.allclose(seen["pattern"], pattern, atol=1e-5)
    unscaled = (scores * rec.attn_scale).masked_fill(future, float("-inf")).softmax(-1)
    assert not torch.allclose(seen["pattern"], unscaled, atol=1e-3)  # the check can tell


def _fake(**cfg):
    """A model-like object whose config carries only the required sizes plus ``cfg``."""
    base = dict(n_layers=3, d_model=12, n_heads=3, d_mlp=20, d_vocab=7, n_ctx=5)
    return SimpleNamespace(cfg=SimpleNamespace(**{**base, **cfg}))


def test_defaults_of_a_bare_config():
    """Every attribute TransformerLens configs may lack has one documented default."""
    rec = Architecture.from_model(_fake())
    assert rec.normalization == "LN" and not rec.no_norm  # never assumed norm-free
    assert rec.eps is None and rec.act_fn is None and rec.dtype is None
    assert not rec.gated_mlp and not rec.parallel  # no hook_dict: only the config decides
    assert rec.positional_embedding == "standard" and rec.causal
    assert rec.n_key_value_heads == 3 and rec.d_head == 4 and rec.d_mlp == 20
    assert rec.d_vocab_out == 7 and rec.native
    assert rec.attn_scale == pytest.approx(2.0)
    assert rec.attn_scores_soft_cap is None and rec.output_logits_soft_cap is None


def test_config_values_and_conventions():
    rec = Architecture.from_model(_fake(
        normalization_type="RMSPre", eps=1e-6, act_fn="GELU_New", gated_mlp=True,
        parallel_attn_mlp=True, positional_embedding_type="rotary", attention_dir="bidirectional",
        n_key_value_heads=1, d_head=6, d_vocab_out=-1, attn_scale=-1.0,
        attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, architecture="GemmaForCausalLM",
        dtype=torch.bfloat16))
    assert rec.normalization == "RMSPre" and rec.eps == 1e-6 and rec.act_fn == "gelu_new"
    assert rec.gated_mlp and rec.parallel and rec.rotary and not rec.causal
    assert rec.grouped_query and rec.n_key_value_heads == 1 and rec.d_head == 6
    assert rec.d_vocab_out == 7 and not rec.native and rec.dtype == torch.bfloat16
    assert rec.attn_scale == pytest.approx(math.sqrt(6))
    assert (rec.attn_scores_soft_cap, rec.output_logits_soft_cap) == (50.0, 30.0)
    assert Architecture.from_model(_fake(attn_only=True, d_mlp=None)).d_mlp is None
    assert Architecture.from_model(_fake(act_fn=None)).act_fn is None
    assert Architecture.from_model(_fake(use_attn_scale=False, attn_scale=9.0)).attn_scale == 1.0


@pytest.mark.parametrize("value", [None, -1.0, 0.0])
def test_soft_caps_off(value):
    rec = Architecture.from_model(_fake(attn_scores_soft_cap=value,
                                        output_logits_soft_cap=value))
    assert rec.attn_scores_soft_cap is None and rec.output_logits_soft_cap is None


def test_parallel_from_the_missing_resid_mid_hook():
    """A model without ``blocks.0.hook_resid_mid`` is parallel whatever its config says."""
    fake = _fake(parallel_attn_mlp=False)
    fake.hook_dict = {"blocks.0.hook_resid_pre": None}
    assert Architecture.from_model(fake).parallel
    assert not Architecture.from_model(fake, hook_names={"blocks.0.hook_resid_mid"}).parallel
    assert not Architecture.from_model(_fake(n_layers=0), hook_names=set()).parallel


def test_record_is_frozen_and_readable():
    rec = Architecture.from_model(_fake())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.n_layers = 4
    lines = repr(rec).splitlines()
    names = [f.name for f in dataclasses.fields(Architecture)]
    assert lines[0] == "Architecture(" and lines[-1] == ")"
    assert [ln.strip().split("=")[0] for ln in lines[1:-1]] == names


def test_config_dtype_of_any_module():
    assert config_dtype(torch.nn.Linear(2, 2)) is None
    assert config_dtype(_fake(dtype=torch.float16)) == torch.float16
