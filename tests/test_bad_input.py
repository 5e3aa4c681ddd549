"""Every bad input gets a specific exception whose message says what to do."""

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import (
    BackendError,
    BasisMismatchError,
    DataError,
    NonFiniteError,
    SiteError,
    Threshold,
    TLDegenError,
)


@pytest.fixture(scope="module")
def relu_model():
    return M.build("native_relu")


@pytest.fixture(scope="module")
def neox_model(tmp_path_factory):
    return M.build("neox", M.save_word_tokenizer(tmp_path_factory.mktemp("tok")))


TOKENS = M.random_tokens(6, 5)

CASES = [
    # (tokens, sites, kwargs, exception, message)
    (TOKENS, ["resid_pre.0", "resid_mdi.0"], {}, SiteError, "unknown site kind 'resid_mdi'"),
    (TOKENS, ["resid_post.0", "resid_pre.0"], {}, SiteError, "out of forward order"),
    (TOKENS, ["resid_pre.0", "resid_pre.0"], {}, SiteError, "appears twice"),
    (TOKENS, ["resid_pre.0:7"], {}, SiteError, "position 7 .* out of range .* length 5"),
    (TOKENS, ["resid_pre.5"], {}, SiteError, "layer 5 but the model has 2 layer"),
    (TOKENS[:0], ["resid_pre.0"], {}, DataError, "no tokens"),
    ([], ["resid_pre.0"], {}, DataError, "no tokens"),
    (TOKENS.float(), ["resid_pre.0"], {}, DataError, "integer ids"),
    (TOKENS[0], ["resid_pre.0"], {}, DataError, r"expected \[batch, pos\]"),
    (TOKENS + 100, ["resid_pre.0"], {}, DataError, r"must lie in \[0, 40\)"),
    (torch.zeros(2, 9, dtype=torch.long), ["resid_pre.0"], {}, DataError, "exceed .* n_ctx=8"),
    # batches of different lengths are fine, unless a site names a position one lacks
    ([TOKENS, TOKENS[:, :3]], ["resid_pre.0:4"], {}, SiteError, "out of range"),
    (TOKENS, ["resid_pre.0"], {"method": "ica"}, TLDegenError, "unknown method 'ica'"),
    (TOKENS, ["resid_pre.0"], {"integration": "simpson"}, TLDegenError, "unknown integration"),
    (TOKENS, ["resid_pre.0"], {"batch_size": 0}, DataError, "batch_size must be"),
    (TOKENS, ["resid_pre.0"], {"threshold": "big"}, TLDegenError, "threshold must be"),
    ("t1 t2", ["resid_pre.0"], {}, DataError, "must be a \\[batch, pos\\] tensor"),
]


@pytest.mark.parametrize("tokens, sites, kwargs, exc, message", CASES)
def test_fit_bases_rejects(relu_model, tokens, sites, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        tl_degen.fit_bases(relu_model, tokens, sites, progress=False, **kwargs)


def test_negative_threshold():
    with pytest.raises(TLDegenError, match="non-negative"):
        Threshold.absolute(-1.0)
    with pytest.raises(TLDegenError, match="'relative' or 'absolute'"):
        Threshold(1e-3, "percent")


def test_resid_mid_on_parallel_blocks(neox_model):
    with pytest.raises(SiteError, match="parallel attention\\+MLP .* Use 'resid_pre.1', "
                                        "'mlp_post.1'"):
        tl_degen.fit_bases(neox_model, TOKENS, ["resid_mid.1"], progress=False)


def test_nan_activations_are_reported():
    model = M.build("native_relu")
    with torch.no_grad():
        weight = next(p for n, p in model.named_parameters() if "mlp" in n and "weight" in n)
        weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf value\\(s\\) in activations at"):
        tl_degen.fit_bases(model, TOKENS, ["resid_pre.0", "resid_post.0"], progress=False)


def test_not_a_transformerlens_model():
    with pytest.raises(BackendError, match="TransformerBridge or HookedTransformer"):
        tl_degen.fit_bases(torch.nn.Linear(2, 2), TOKENS, ["resid_pre.0"], progress=False)


def test_logits_only_last(relu_model):
    with pytest.raises(SiteError, match="out of forward order"):
        tl_degen.fit_bases(relu_model, TOKENS, ["logits", "resid_pre.0"], progress=False)


def test_coords_of_wrong_size(relu_model):
    bases = tl_degen.fit_bases(relu_model, TOKENS, ["resid_pre.1"], method="pca", progress=False)
    with pytest.raises(BasisMismatchError, match="do not fit site 'resid_pre.1'"):
        bases["resid_pre.1"].to_coords(torch.ones(3, 30))
    with pytest.raises(BasisMismatchError, match="coordinates"):
        bases["resid_pre.1"].from_coords(torch.ones(3, 1000))
    with pytest.raises(KeyError, match="no basis for site 'resid_mid.1'"):
        bases["resid_mid.1"]
