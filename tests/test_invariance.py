"""LIB is invariant under function-preserving reparameterisations (DESIGN.md §4); PCA and
neuron bases are not.

Every case runs :func:`tl_degen.check_invariance` (fit, graph and coordinates of both
models) and asserts LIB's targets (:data:`tl_degen.diagnostics.INVARIANCE_TARGETS`): Λ within
1e-8 relative for every direction with Λ > 1e-8·max and 1e-4 for Λ > 1e-12·max, coordinates
of the data, edges and single-direction patching effects within 1e-6 on the leading
directions, the same number of kept directions, at every site. The models: the shipped
modular-addition model (ReLU, no LayerNorm: the closed-form sections, rank-deficient
resid_pre, a gapless resid_mid spectrum), the reference checkpoint, a GELU+LayerNorm model
and a Llama-style model (RMSNorm, rotary, gated MLP; the autograd path). A change of residual
basis preserves the function only without LayerNorm, and rescaling neurons only for ReLU or
a gated MLP's linear branch, so those cases exist only where they are function-preserving.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import reparam
from tl_degen.toy import modadd

#: the built-in reparameterisations rebuild native bridges on TransformerLens 4 and
#: HookedTransformers on 3.x
LOAD = modadd.load_hooked_transformer if M.HAS_HOOKED_TRANSFORMER else modadd.load_bridge
LN_ARCH = "hooked_transformer" if M.HAS_HOOKED_TRANSFORMER else "native_ln_gelu"
MODADD_SITES = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
                "logits:last"]


def residual_basis_and_rescale(model):
    """A random change of residual basis with condition number 4, then every ReLU neuron
    rescaled by exp(0.7·N(0,1)): the issue's composite reparameterisation."""
    return reparam.rescale_neurons(reparam.change_residual_basis(model, seed=1, condition=4.0),
                                   seed=2)


def assert_invariant(rep: tl_degen.InvarianceReport) -> None:
    assert rep.rows, rep
    for r in rep.rows:
        assert r["k_before"] == r["k_after"], (rep.transform, r)
    assert rep.holds("lib"), rep


@pytest.fixture(scope="module")
def shipped():
    model = LOAD(modadd.load_state_dict(), dtype=torch.float64)
    return model, modadd.tokens_for(modadd.train_test_split()[0][:1500])


MODADD_CASES = {"residual basis (cond 4) + rescaled neurons": residual_basis_and_rescale,
                "permuted neurons": reparam.permute_neurons,
                "split neuron": reparam.split_neuron,
                "dead neurons": reparam.add_dead_neurons}


@pytest.mark.parametrize("name", list(MODADD_CASES))
def test_lib_is_invariant_on_modadd(name, shipped):
    model, tokens = shipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
        rep = tl_degen.check_invariance(model, tokens, MODADD_SITES, MODADD_CASES[name],
                                        methods=("lib",), progress=False)
    assert rep.function_change < 1e-13
    assert_invariant(rep)


def test_lib_is_invariant_on_the_reference_checkpoint(reference_dir):
    """The reference implementation's own checkpoint, 1500 training pairs."""
    model = LOAD(modadd.load_state_dict(reference_dir / "model.safetensors"),
                 dtype=torch.float64)
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
        rep = tl_degen.check_invariance(model, tokens, MODADD_SITES, residual_basis_and_rescale,
                                        methods=("lib",), progress=False)
    assert_invariant(rep)


def test_patching_effects_are_invariant_on_modadd(shipped):
    model, tokens = shipped
    train, test = modadd.train_test_split()
    clean, corrupted = modadd.tokens_for(test[:64]), modadd.tokens_for(test[64:128])
    labels = modadd.labels_for(test[:64])

    def metric(logits):
        return logits[:, -1].log_softmax(-1).gather(1, labels[:, None]).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
        rep = tl_degen.check_invariance(model, tokens, MODADD_SITES, residual_basis_and_rescale,
                                        methods=("lib",), clean_tokens=clean,
                                        corrupted_tokens=corrupted, metric=metric,
                                        progress=False)
    assert all(r["patching_change"] == r["patching_change"] for r in rep.rows)  # measured
    assert_invariant(rep)


LN_CASES = {"permuted neurons": reparam.permute_neurons, "split neuron": reparam.split_neuron,
            "dead neurons": reparam.add_dead_neurons}


@pytest.mark.parametrize("name", list(LN_CASES))
def test_lib_is_invariant_on_a_gelu_layernorm_model(name):
    model = M.build(LN_ARCH)
    tokens = M.random_tokens(48, 6)
    clean, corrupted = M.random_tokens(8, 6, seed=5), M.random_tokens(8, 6, seed=6)
    rep = tl_degen.check_invariance(model, tokens, M.mid_sites(LN_ARCH), LN_CASES[name],
                                    methods=("lib",), clean_tokens=clean,
                                    corrupted_tokens=corrupted,
                                    metric=lambda logits: logits[:, -1, 0].mean(), progress=False)
    assert_invariant(rep)


@pytest.mark.parametrize("kind", ["permute_neurons", "rescale_neurons", "split_neuron",
                                  "add_dead_neurons", "permute_heads", "rotate_residual"])
def test_lib_is_invariant_on_a_llama_model(kind, tokenizer_dir):
    """The built-ins on a Hugging Face Llama bridge (gated SwiGLU MLP, grouped-query
    attention 4/2, RMSNorm, rotary). A rotated residual stream changes the RMSNorm's input,
    which Hugging Face's norm rounds to float32: the model's norms compute in float64 here."""
    model = M.build("llama", tokenizer_dir)
    if kind == "rotate_residual":
        M.exact_float64(model)
    tokens = M.random_tokens(48, 6)
    rep = tl_degen.check_invariance(model, tokens, M.mid_sites("llama"), kind,
                                    methods=("lib",), progress=False)
    assert_invariant(rep)


@pytest.mark.parametrize("kind", ["permute_neurons", "split_neuron", "permute_heads",
                                  "rotate_residual"])
def test_llama_reparameterisations_change_the_weights_not_the_function(kind, tokenizer_dir):
    """The new model computes the same logits (float64: 1e-12) with other weights, and
    leaves the original untouched; heads move only within their key/value group."""
    model = M.exact_float64(M.build("llama", tokenizer_dir))
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    new = reparam.REPARAMETERISATIONS[kind](model)
    tokens = M.random_tokens(4, 6)
    with torch.no_grad():
        a, b = model(tokens), new(tokens)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-12
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in new.original_model.state_dict().items()
               if k not in before or v.shape != before[k].shape or not torch.equal(v, before[k])]
    assert changed
    if kind == "permute_heads":
        untouched = ("k_proj", "v_proj", ".k.", ".v.", "mlp")  # keys, values (grouped), MLPs
        assert not [k for k in changed if any(u in k for u in untouched)]
        key = next(k for k in before if k.startswith("model.layers.0") and "q_proj" in k)
        q0 = before[key].reshape(4, 4, -1)
        q1 = new.original_model.state_dict()[key].reshape(4, 4, -1)
        for group in (slice(0, 2), slice(2, 4)):  # 2 query heads per key/value head
            assert sorted(float(h.sum()) for h in q0[group]) == \
                sorted(float(h.sum()) for h in q1[group])


def test_pca_and_neuron_bases_are_not_invariant(shipped):
    model, tokens = shipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
        rep = tl_degen.check_invariance(model, tokens[:600], MODADD_SITES,
                                        residual_basis_and_rescale, methods=("pca", "neuron"),
                                        edges=False, progress=False)
    assert rep.worst("pca", "eigenvalue_change") > 0.1
    assert rep.worst("neuron", "coordinate_change") > 1e-2
    assert not rep.holds("pca") and not rep.holds("neuron")
