"""Regressions for problems found in review: each was a silent wrong answer or an unclear
error before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import BasisMismatchError, BasisSet, DataError, Site, SiteError
from tl_degen.adapters import get_adapter
from tl_degen.toy import modadd


def test_unreachable_site_is_an_error():
    model = M.build("native_relu")
    with pytest.raises(SiteError, match="cannot see this site's positions"):
        tl_degen.fit_bases(model, M.random_tokens(8, 5),
                           ["resid_pre.1:last", "resid_mid.1:0", "logits:0"], progress=False)


def test_zero_threshold_never_divides_by_zero():
    model = M.build("native_relu")
    tokens = M.random_tokens(1, 5).repeat(4, 1)  # identical sequences: a rank-0 covariance
    bases = tl_degen.fit_bases(model, tokens, ["resid_pre.1:last", "resid_mid.1:last"],
                               threshold=tl_degen.Threshold.absolute(0.0), progress=False)
    for b in bases.values():
        assert torch.isfinite(b.C).all() and torch.isfinite(b.C_pinv).all()


def test_relative_threshold_ignores_the_units_of_the_data():
    """Scaling the embeddings scales every data eigenvalue: the kept set must not change."""
    sd = modadd.init_state_dict(modadd.ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64))
    tokens = modadd.tokens_for(modadd.all_pairs()[::50])
    kept = []
    for scale in (1.0, 1e-4):
        sd2 = dict(sd, **{"embed.W_E": sd["embed.W_E"] * scale,
                          "pos_embed.W_pos": sd["pos_embed.W_pos"] * scale})
        cfg = modadd.ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64)
        model = modadd.load_bridge(sd2, cfg=cfg, dtype=torch.float64)
        kept.append(tl_degen.fit_bases(model, tokens, ["resid_pre.0"], method="pca",
                                       threshold=1e-6, progress=False)["resid_pre.0"].k)
    assert kept[0] == kept[1]


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


@pytest.mark.parametrize("arch", [a for a in M.ARCHITECTURES if a != "hooked_transformer"]
                         + (["hooked_transformer"] if M.HAS_HOOKED_TRANSFORMER else []))
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


def test_bf16_bases_accept_their_own_model(tokenizer_dir, tmp_path):
    model = M.build("gpt2", tokenizer_dir, dtype=torch.bfloat16)
    bases = tl_degen.fit_bases(model, M.random_tokens(6, 5), ["resid_pre.1", "logits"],
                               method="pca", progress=False)
    bases.check_model(model)
    BasisSet.load(bases.save(tmp_path / "b.safetensors"), model=model)


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


def test_damaged_basis_files(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = M.build("native_relu")
    bases = tl_degen.fit_bases(model, M.random_tokens(6, 5), ["resid_pre.1", "logits"],
                               method="pca", progress=False)
    path = bases.save(tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    broken = dict(tensors)
    del broken["resid_pre.1/gram"]
    save_file(broken, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="incomplete"):
        BasisSet.load(tmp_path / "missing.safetensors")
    broken = dict(tensors, **{"resid_pre.1/C_pinv": tensors["resid_pre.1/C_pinv"][:-1]})
    save_file(broken, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="C_pinv has shape"):
        BasisSet.load(tmp_path / "shape.safetensors")
    other = modadd.load_bridge()
    with pytest.raises(BasisMismatchError):
        BasisSet.load(path, model=other)


def test_site_fields_are_validated():
    assert Site("resid_pre", 0, [0, 2]).positions == (0, 2)
    assert hash(Site("resid_pre", 0, [0, 2])) == hash(Site.parse("resid_pre.0:0,2"))
    with pytest.raises(SiteError, match="layer must be an int"):
        Site("resid_pre", "1")
    with pytest.raises(SiteError, match="positions must be integers"):
        Site("resid_pre", 0, (1.5,))


def test_numpy_and_nested_list_tokens():
    model = M.build("native_relu")
    tokens = M.random_tokens(4, 5)
    ref = tl_degen.site_activations(model, tokens, "resid_pre.1")
    assert torch.equal(tl_degen.site_activations(model, tokens.numpy(), "resid_pre.1"), ref)
    assert torch.equal(tl_degen.site_activations(model, tokens.tolist(), "resid_pre.1"), ref)
    assert torch.equal(tl_degen.site_activations(model, np.asarray(tokens), "resid_pre.1"), ref)


def test_no_hooks_left_after_an_error():
    model = M.build("native_ln_gelu")
    adapter = get_adapter(model)

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    before = n_hooks()
    x = torch.ones(2, 1, 17, dtype=torch.float64)
    with pytest.raises(SiteError):
        adapter.run(M.random_tokens(2, 5), Site.parse("logits"),
                    (Site.parse("resid_pre.1:9"), x))
    assert n_hooks() == before


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
