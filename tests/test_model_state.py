"""tl_degen.model_state.prepared: the state a pass of the library puts a model in (eval mode,
float64, grad mode on) and everything it restores afterwards."""

from __future__ import annotations

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen.model_state import prepared


def test_reads_use_eval_mode(tokenizer_dir):
    model = M.build("gpt2", tokenizer_dir).train()  # HF dropout on
    hf = model.blocks[0]
    tokens = M.random_tokens(4, 5)
    a = tl_degen.site_activations(model, tokens, "resid_post.1")
    b = tl_degen.site_activations(model, tokens, "resid_post.1")
    assert torch.equal(a, b) and model.training and hf.training


def test_reads_use_eval_mode_when_only_the_wrapped_model_trains(tokenizer_dir):
    """A bridge's HF model in training mode on its own (the bridge itself in eval mode):
    the reads still switch its dropout off."""
    model = M.build("gpt2", tokenizer_dir)
    model.original_model.train()
    assert not model.training and model.original_model.training
    tokens = M.random_tokens(4, 5)
    a = tl_degen.site_activations(model, tokens, "resid_post.1")
    b = tl_degen.site_activations(model, tokens, "resid_post.1")
    assert torch.equal(a, b)


def test_dtypes_restored_tensor_by_tensor(tokenizer_dir):
    model = M.build("llama", tokenizer_dir, dtype=torch.bfloat16)
    for m in model.modules():  # as HF keeps them: rotary tables in float32
        for name, b in m._buffers.items():
            if b is not None and "inv_freq" in name:
                m._buffers[name] = b.float()
    before = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert len(set(before.values())) > 1  # bf16 weights, float32 rotary buffers
    tl_degen.fit_bases(model, M.random_tokens(4, 5), ["resid_pre.1", "resid_post.1:last"],
                       method="pca", progress=False)
    after = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after == before


def test_a_float32_model_still_runs_after_a_float64_fit(arch, tokenizer_dir):
    """A HookedTransformer casts its embeddings to ``cfg.dtype``: the fit (float64) must put
    that back too, or the float32 model fails on its next forward pass."""
    model = M.build(arch, tokenizer_dir, dtype=torch.float32)
    tokens = M.random_tokens(4, 5)
    with torch.no_grad():
        before = model(tokens)
    tl_degen.fit_bases(model, tokens, ["resid_pre.1", "resid_post.1:last"], progress=False)
    assert getattr(model.cfg, "dtype", torch.float32) == torch.float32
    with torch.no_grad():
        after = model(tokens)
    assert after.dtype == torch.float32 and torch.equal(after, before)


@pytest.mark.slow  # three LayerNorm fits, each through autograd
def test_fit_inside_no_grad_and_inference_mode():
    model = M.build("native_ln_gelu")
    tokens = M.random_tokens(6, 5)
    sites = ["resid_pre.1", "resid_mid.1", "logits"]
    with torch.no_grad():
        a = tl_degen.fit_bases(model, tokens, sites, progress=False)
    with torch.inference_mode():
        b = tl_degen.fit_bases(model, tokens, sites, progress=False)
    c = tl_degen.fit_bases(model, tokens, sites, progress=False)
    for s in sites:
        assert torch.allclose(a[s].eigenvalues, c[s].eigenvalues, rtol=1e-10)
        assert torch.allclose(b[s].eigenvalues, c[s].eigenvalues, rtol=1e-10)


@pytest.mark.parametrize("own, narrow", [(torch.float64, torch.float32),
                                         (torch.float32, torch.bfloat16),
                                         (torch.float32, torch.float16)])
def test_a_pass_in_a_narrower_dtype_leaves_the_weights_bit_for_bit(own, narrow):
    """The cast is undone by restoring the original tensors, not by casting back (which
    would round every weight to the narrower dtype's precision)."""
    model = M.build("native_ln_gelu").to(own)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with prepared(model, narrow):
        assert all(p.dtype == narrow for p in model.parameters())
    for n, p in model.named_parameters():
        assert p.dtype == own and torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.int64, "float32", 32])
def test_a_pass_in_a_non_float_dtype_is_refused(dtype):
    from tl_degen import ArgumentError

    with pytest.raises(ArgumentError, match="dtype must be"):
        with prepared(M.build("native_relu"), dtype):
            pass
