"""The effective parameter count N_eff = 2λ of the behavioural loss (tl_degen.effective).

Independent checks: a closed-form case (a full-rank linear map under an MSE behavioural loss
has λ = d/2), function-preserving reparameterisations that add parameters but not λ, and a
model with planted redundant units.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import reparam
from tl_degen.effective import _split_r_hat
from tl_degen.errors import TLDegenError
from tl_degen.toy import modadd


def linear_readout_model():
    """A model whose logits are ``h W_U`` with ``h = W_E[token]`` (blocks and positional
    embedding zeroed) and ``W_E`` with orthonormal columns: the behavioural loss of the
    unembedding is an exactly quadratic, well-conditioned function of ``d_model·d_vocab``
    parameters (plus ``d_vocab`` for ``b_U`` where it is a parameter: ``[h, 1]`` is full rank,
    so the minimum stays regular)."""
    model = M.build("native_relu")
    with torch.no_grad():
        for name in ("blocks", "pos_embed"):
            for p in model.get_submodule(name).parameters():
                p.zero_()
        (w_e,) = model.get_submodule("embed").parameters()
        q, _ = torch.linalg.qr(
            torch.randn(w_e.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )
        w_e.copy_(q * (w_e.shape[0] / w_e.shape[1]) ** 0.5)
    return model


def small_run(model, tokens, **kw):
    args = dict(num_chains=2, num_draws=20, num_burnin_steps=5, lr=1e-3, progress=False)
    return tl_degen.effective_parameters(model, tokens, **{**args, **kw})


# ---------------------------------------------------------------------------- groups
def test_parameter_groups_split_a_block_into_attention_and_mlp():
    model = modadd.load_bridge()
    groups = tl_degen.parameter_groups(
        model, ["model", "blocks.0", "blocks.0.attn", "blocks.0.mlp", "embed", "unembed"]
    )
    n = {g: sum(p.numel() for p in ps) for g, ps in groups.items()}
    d, dm, v = 128, 512, 114
    assert n["blocks.0.attn"] == 4 * (d * d + d)  # W_Q, W_K, W_V, W_O and their biases
    assert n["blocks.0.mlp"] == 2 * d * dm + dm + d
    assert n["blocks.0"] == n["blocks.0.attn"] + n["blocks.0.mlp"]
    assert n["embed"] == v * d
    # W_U, plus b_U where it is a parameter (TransformerLens 3.x bridge), not a buffer (4.x)
    assert n["unembed"] in (v * d, v * d + v)
    assert (
        n["model"]
        == sum(p.numel() for p in model.parameters())
        == n["blocks.0"] + n["embed"] + n["unembed"] + 3 * d
    )
    merged = tl_degen.parameter_groups(model, {"io": ["embed", "unembed", "embed"]})
    assert sum(p.numel() for p in merged["io"]) == n["embed"] + n["unembed"]  # each once


@pytest.mark.skipif(not M.HAS_HOOKED_TRANSFORMER, reason="needs transformer_lens 3.x")
def test_parameter_groups_agree_between_backends():
    names = ["blocks.0", "blocks.0.attn", "blocks.0.mlp", "unembed"]
    counts = [
        {
            g: sum(p.numel() for p in ps)
            for g, ps in tl_degen.parameter_groups(load(), names).items()
        }
        for load in (modadd.load_bridge, modadd.load_hooked_transformer)
    ]
    # b_U is a parameter of HookedTransformer; on a native bridge it is a parameter on 3.x and
    # a buffer on 4.x
    assert counts[1]["unembed"] == 114 * 128 + 114
    assert counts[0]["unembed"] in (114 * 128, 114 * 128 + 114)
    del counts[0]["unembed"], counts[1]["unembed"]
    assert counts[0] == counts[1]


def test_unknown_group_is_an_error():
    with pytest.raises(TLDegenError, match="no parameters in group 'blocks.7'"):
        tl_degen.parameter_groups(modadd.load_bridge(), "blocks.7")


# ---------------------------------------------------------------------------- the sampler
def test_same_seed_same_result_and_weights_restored():
    model = M.build("native_ln_gelu")
    tokens = M.random_tokens(16, 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = small_run(model, tokens, params=["model", "blocks.1.mlp"], seed=3)
    b = small_run(model, tokens, params=["model", "blocks.1.mlp"], seed=3)
    c = small_run(model, tokens, params=["model", "blocks.1.mlp"], seed=4)
    alone = small_run(model, tokens, params="blocks.1.mlp", seed=3)
    # chains and groups each start from w*: the group sampled after "model" is unaffected
    assert torch.equal(alone["blocks.1.mlp"].loss_trace, a["blocks.1.mlp"].loss_trace)
    for g in ("model", "blocks.1.mlp"):
        assert torch.equal(a[g].loss_trace, b[g].loss_trace)
        assert a[g].llc == b[g].llc
        assert not torch.equal(a[g].loss_trace, c[g].loss_trace)
        assert a[g].loss_trace.shape == (2, 20)
        assert a[g].llc > 0 and math.isfinite(a[g].llc_se)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n] and p.grad is None
    assert "N_eff" in repr(a) and "blocks.1.mlp" in a.table()


def test_a_diverging_chain_is_reported_not_hidden():
    model = M.build("native_relu")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="diverged"):
        out = small_run(model, M.random_tokens(16, 6), divergence="mse", lr=1e3)
    assert out["model"].warnings and not math.isfinite(out["model"].llc)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_split_r_hat_separates_agreeing_and_disagreeing_chains():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(4, 400, generator=g, dtype=torch.float64)
    shifted = same + torch.tensor([0.0, 0.0, 3.0, 3.0], dtype=torch.float64)[:, None]
    assert abs(_split_r_hat(same) - 1) < 0.02
    assert _split_r_hat(shifted) > 1.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"divergence": "l1"}, "unknown divergence"),
        ({"positions": [9]}, "out of range"),
        ({"positions": "middle"}, "positions must be"),
        ({"positions": [5, -1]}, "twice"),
        ({"positions": [1.5]}, "positions must be"),
        ({"num_chains": True}, "num_chains must be a positive integer"),
        ({"params": {"g": []}}, "is empty"),
        ({"params": []}, "no parameter groups"),
        ({"num_chains": 0}, "num_chains must be a positive integer"),
        ({"lr": -1.0}, "lr must be a finite non-negative"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"nbeta": 0.0}, "nbeta must be positive"),
        ({"params": "blocks.9"}, "no parameters in group"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(TLDegenError, match=match):
        small_run(M.build("native_relu"), M.random_tokens(8, 6), **kwargs)


# ---------------------------------------------------------------------------- closed form
@pytest.mark.slow
def test_full_rank_linear_map_has_lambda_d_over_2():
    """MSE behavioural loss of the unembedding of :func:`linear_readout_model`: a regular
    quadratic minimum of 640 parameters, λ = 320. The Hessian's eigenvalues lie within a
    factor 2.1 of each other (printed), so 100 burn-in steps cover ~2 relaxation times of the
    slowest mode at lr 0.02; localization 0 leaves the quadratic unbiased."""
    model = linear_readout_model()
    out = tl_degen.effective_parameters(
        model,
        M.random_tokens(64, 6),
        "unembed",
        divergence="mse",
        lr=0.02,
        localization=0.0,
        batch_size=None,
        num_chains=4,
        num_draws=400,
        num_burnin_steps=100,
        progress=False,
    )
    est = out["unembed"]
    print(est)
    assert est.n_params in (16 * M.VOCAB, 17 * M.VOCAB)  # W_U (and b_U on TL 3.x bridges)
    assert abs(est.llc - est.n_params / 2) <= 3 * est.llc_se, est
    assert est.llc_se < 0.03 * est.n_params / 2


# ---------------------------------------------------------------------------- modadd
# 1000 pairs: nβ = 1000/log 1000 = 145, where lr 2e-4 sits as far below the divergence step as
# the default 5e-5 does at the benchmark's nβ = 465 (3830 pairs).
MODADD_ARGS = dict(
    positions="last", lr=2e-4, num_chains=4, num_draws=150, num_burnin_steps=150, progress=False
)


@pytest.fixture(scope="module")
def modadd_neff():
    """N_eff of the shipped modadd model and of three function-preserving rewrites of it."""
    load = modadd.load_hooked_transformer if M.HAS_HOOKED_TRANSFORMER else modadd.load_bridge
    base = load()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1000])
    models = {
        "base": base,
        "dead": reparam.add_dead_neurons(base, n=512, seed=1),
        "split": reparam.split_neuron(base),
        "permute": reparam.permute_neurons(base, seed=2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            name: tl_degen.effective_parameters(m, tokens, "model", **MODADD_ARGS)["model"]
            for name, m in models.items()
        }


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dead", "split", "permute"])
def test_modadd_neff_unchanged_by_reparameterisation(modadd_neff, variant):
    base, new = modadd_neff["base"], modadd_neff[variant]
    print(base, new)
    if variant != "permute":
        assert new.n_params > base.n_params
    else:
        assert new.n_params == base.n_params
    assert abs(new.n_eff - base.n_eff) <= 3 * math.hypot(base.n_eff_se, new.n_eff_se)
    assert base.n_eff < 0.05 * base.n_params  # far fewer than the raw count


@pytest.mark.slow
def test_planted_redundant_units_lower_neff_per_parameter(modadd_neff):
    base, dead = modadd_neff["base"], modadd_neff["dead"]
    ratio = {k: v.n_eff / v.n_params for k, v in modadd_neff.items()}
    se = {k: v.n_eff_se / v.n_params for k, v in modadd_neff.items()}
    assert dead.n_params - base.n_params == 512 * (128 + 1 + 128)  # +58% parameters
    assert ratio["base"] - ratio["dead"] > 3 * math.hypot(se["base"], se["dead"])


# ---------------------------------------------------------------------------- the report
def test_degeneracy_report_shows_neff_beside_parameters_and_lib_sizes():
    model = M.build("native_relu")
    tokens = M.random_tokens(24, 6)
    sites = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "logits:last"]
    rep = tl_degen.degeneracy_report(
        model,
        tokens,
        sites,
        progress=False,
        effective=True,
        effective_kwargs=dict(num_chains=2, num_draws=10, num_burnin_steps=5, lr=1e-3),
    )
    groups = [e.group for e in rep.effective]
    assert groups == ["model", "blocks.1"]
    assert rep.effective.config["positions"] == [5]  # the logits site's last position
    assert rep.effective["blocks.1"].n_params == sum(
        p.numel() for p in model.get_submodule("blocks.1").parameters()
    )
    bases = tl_degen.fit_bases(model, tokens, sites, threshold=1e-10, progress=False)
    assert rep.lib_sizes == {s: bases[s].k for s in sites[:-1]}
    table = rep.effective_table()
    assert "N_eff" in table and f"resid_mid.1 {bases['resid_mid.1'].k}" in table
    as_dict = json.loads(json.dumps(rep.as_dict()))
    assert as_dict["effective"]["estimates"][1]["n_params"] == rep.effective["blocks.1"].n_params
    assert as_dict["effective"]["estimates"][1]["loss_trace"] == (
        rep.effective["blocks.1"].loss_trace.tolist()
    )
    plain = tl_degen.degeneracy_report(model, tokens, sites, progress=False, bases=bases)
    assert plain.effective is None and "N_eff" not in plain.table()
    reused = tl_degen.degeneracy_report(
        model, tokens, sites, progress=False, bases=bases, effective=rep.effective
    )
    assert reused.effective_table() == table
    with pytest.raises(TLDegenError, match="cannot choose params"):
        tl_degen.degeneracy_report(
            model,
            tokens,
            sites,
            progress=False,
            bases=bases,
            effective=True,
            effective_kwargs={"params": "blocks.0"},
        )
    other = M.build("native_ln_gelu")
    with pytest.raises(tl_degen.BasisMismatchError, match="parameters"):
        tl_degen.degeneracy_report(other, tokens, sites, progress=False, effective=rep.effective)


def test_a_long_run_says_what_it_costs_after_one_step(monkeypatch):
    """Above ``LONG_RUN_SECONDS`` the first step's time, times every step asked for, is
    announced once (``LongRunWarning``); the estimate changes nothing (same seed, same
    traces); below it nothing is said."""
    import warnings

    from tl_degen import effective

    model = M.build("native_ln_gelu")
    tokens = M.random_tokens(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tl_degen.LongRunWarning)
        quiet = small_run(model, tokens, params=["model", "blocks.1.mlp"], seed=3)
    monkeypatch.setattr(effective, "LONG_RUN_SECONDS", 0.0)
    with pytest.warns(tl_degen.LongRunWarning, match=r"100 SGLD steps take about") as record:
        loud = small_run(model, tokens, params=["model", "blocks.1.mlp"], seed=3)
    assert sum(r.category is tl_degen.LongRunWarning for r in record) == 1
    for g in ("model", "blocks.1.mlp"):
        assert torch.equal(quiet[g].loss_trace, loud[g].loss_trace)
