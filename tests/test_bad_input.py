"""Every bad input gets a specific exception whose message says what to do."""

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import (
    ArgumentError,
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
    (TOKENS, ["resid_pre.0"], {"batch_size": 0}, ArgumentError, "batch_size must be at least 1"),
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


def test_nan_weights_and_overflowing_activations_are_reported():
    model = M.build("native_relu")
    weight = next(p for n, p in model.named_parameters() if "mlp" in n and "weight" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="parameter .*mlp.* holds NaN or Inf"):
        tl_degen.fit_bases(model, TOKENS, ["resid_pre.0", "resid_post.0"], progress=False)
    with torch.no_grad():  # finite weights whose activations overflow float64
        for n, p in model.named_parameters():
            if "mlp" in n and "weight" in n:
                p.fill_(1e200)
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


# ---------------------------------------------------------------------------- the checks layer
@pytest.fixture(scope="module")
def fitted_relu(relu_model):
    tokens = M.random_tokens(12, 5)
    bases = tl_degen.fit_bases(relu_model, tokens, ["resid_pre.1", "resid_post.1"],
                               method="pca", progress=False)
    graph = tl_degen.interaction_graph(relu_model, tokens, bases, progress=False)
    return relu_model, tokens, bases, graph


LABELS = torch.zeros(12, dtype=torch.long)
TOKENS_1 = M.random_tokens(1, 5)
VERB_CASES = [
    # (verb, bad keyword arguments, phrase of the message) -> ArgumentError
    ("ablation", {"n_kept": [5, 5, 7]}, r"n_kept repeats \[5\]"),
    ("ablation", {"n_kept": [-1]}, r"n_kept\[0\] must be at least 0"),
    ("ablation", {"n_kept": [1.5]}, r"n_kept\[0\] must be an integer"),
    ("ablation", {"n_kept": [True]}, "a bool is not a number"),
    ("ablation", {"n_kept": []}, "n_kept is empty"),
    ("ablation", {"labels": LABELS[:, None]}, r"must have shape \[12\].*reshape"),
    ("ablation", {"labels": LABELS.bool()}, "integer token ids"),
    ("ablation", {"labels": LABELS + 1000}, r"must lie in \[0, 40\)"),
    ("ablation", {"labels": [0] * 12}, "integer tensor of token ids, got list"),
    ("ablation", {"position": 9}, "position 9 is outside prompts of 5 tokens"),
    ("edges", {"n_edges": [-5]}, r"n_edges\[0\] must be at least 0"),
    ("edges", {"tolerance": float("nan")}, "tolerance must be a finite number"),
    ("edges", {"tolerance": 0.1, "upper": -3}, "upper must be at least 0"),
    ("prune", {"threshold": float("nan")}, "threshold must be a finite number"),
    ("prune", {"top_k": 1.5}, "top_k must be an integer"),
    ("prune", {"mass": 0.0}, "mass must be above 0"),
    ("modules", {"resolution": float("nan")}, "resolution must be a finite number"),
    ("fit", {"dtype": torch.bfloat16}, "cannot represent the Jacobians and statistics"),
    ("fit", {"dtype": torch.float16}, "cannot represent the Jacobians and statistics"),
    ("fit", {"dtype": "float64"}, "write torch.float64"),
    ("fit", {"dtype": torch.int64}, "must be a floating dtype"),
    ("fit", {"batch_size": True}, "a bool is not a number"),
    ("fit", {"n_probes": -3}, "n_probes must be at least 1"),
    ("fit", {"threshold": 2.0}, "drops every eigenvalue"),
    ("fit", {"threshold": float("inf")}, "non-negative finite"),
    ("fit", {"threshold": True}, "threshold must be a float"),
    ("fit", {"tokens": TOKENS_1}, "1 sequence gives resid_pre.1:last 1 sample"),
    ("fit_all", {"tokens": TOKENS_1[:, :1]}, "1 sequence gives resid_pre.1 1 sample"),
    ("coords", {"acts": torch.tensor(1.0)}, r"expected site vectors \[\.\.\., 17\]"),
    ("coords", {"acts": [1.0] * 17}, "got list"),
    ("from_coords", {"coords": torch.tensor(1.0)}, "got Tensor ()"),
    ("attribution", {"metric": lambda logits: logits.sum().detach()},
     "does not depend differentiably"),
    ("invariance", {"transform": lambda m: None}, "returned NoneType"),
    ("graph", {"bases": {"resid_pre.1": None}}, r"bases must be a BasisSet \(from fit_bases\)"),
    ("graph", {"n_probes": 0}, "n_probes must be at least 1"),
    ("graph", {"n_probes": 2.5}, "n_probes must be an integer"),
    ("graph", {"seed": "x"}, "seed must be an integer"),
    ("graph", {"dtype": "float32"}, "write torch.float32"),
    ("graph", {"integration": "trapezoid", "n_alpha": 2.5}, "n_alpha must be an integer"),
    ("ablation", {"bases": None}, "bases must be a BasisSet"),
    ("ablation", {"dtype": torch.int64}, "must be a floating dtype"),
    ("ablation", {"site": "resid_mid.1"}, "no basis for site 'resid_mid.1'"),
    ("edges", {"graph": "not a graph"}, "graph must be an InteractionGraph"),
    ("fit", {"seed": 2**70}, "seed must be at most"),
    ("fit", {"center": "no"}, "center must be True or False"),
    ("fit", {"sites": None}, "sites must be a list of site names"),
    ("fit", {"tokens": [["1 2 3"], ["4 5 6"]]}, "tokens must be integer ids"),
    ("fit", {"threshold": tl_degen.Threshold(1e-13, "absolute") if False else "x"},
     "threshold must be a float"),
    ("threshold", {"value": "x"}, "threshold must be a number"),
    ("threshold", {"value": None}, "threshold must be a number"),
    ("every_layer", {"end": 5}, "end=5: use 'logits:last'"),
    ("every_layer", {"kinds": 5}, "give a tuple of block site kinds"),
    ("every_layer", {"layers": 5}, "give a list of block indices"),
    ("graph", {"dtype": torch.float16}, "cannot represent the Jacobians and statistics"),
    ("from_dict", {"cls": tl_degen.AblationCurve, "d": {}}, "lacks 'site', 'method'"),
    ("from_dict", {"cls": tl_degen.PatchResult, "d": {"site": "resid_pre.1"}},
     "PatchResult.from_dict: the dict lacks 'method'"),
    ("from_dict", {"cls": tl_degen.InteractionGraph, "d": {"edges": {}}}, "lacks 'bases'"),
    ("from_dict", {"cls": tl_degen.BasisSet, "d": [1, 2]}, "takes the dict that to_dict"),
    ("dead_neurons", {"n": -1}, "n must be at least 1"),
    ("dead_neurons", {"n": 2.5}, "n must be an integer"),
]


@pytest.mark.parametrize("verb, kwargs, phrase", VERB_CASES)
def test_every_verb_checks_its_arguments(fitted_relu, verb, kwargs, phrase):
    model, tokens, bases, graph = fitted_relu
    calls = {
        "ablation": lambda: tl_degen.ablation_curve(
            model, tokens, kwargs.pop("bases", bases), kwargs.pop("site", "resid_pre.1"),
            "accuracy", **{"labels": LABELS, **kwargs}, progress=False),
        "edges": lambda: tl_degen.edge_ablation(
            model, tokens, kwargs.pop("graph", graph), "accuracy", labels=LABELS,
            progress=False, **{"n_edges": [1], **kwargs}),
        "prune": lambda: graph.prune(**kwargs),
        "modules": lambda: graph.modules(**kwargs),
        "fit": lambda: tl_degen.fit_bases(
            model, kwargs.pop("tokens", tokens), kwargs.pop("sites", ["resid_pre.1:last"]),
            progress=False, **kwargs),
        "graph": lambda: tl_degen.interaction_graph(
            model, tokens, kwargs.pop("bases", bases), progress=False, **kwargs),
        "threshold": lambda: tl_degen.Threshold.absolute(kwargs["value"]),
        "every_layer": lambda: tl_degen.every_layer(model, **kwargs),
        "fit_all": lambda: tl_degen.fit_bases(
            model, kwargs.pop("tokens", tokens), ["resid_pre.1"], progress=False, **kwargs),
        "coords": lambda: bases["resid_pre.1"].to_coords(kwargs["acts"]),
        "from_coords": lambda: bases["resid_pre.1"].from_coords(kwargs["coords"]),
        "attribution": lambda: tl_degen.attribution_patch(
            model, tokens, tokens.flip(0), bases, ["resid_pre.1"], kwargs["metric"],
            progress=False),
        "from_dict": lambda: kwargs["cls"].from_dict(kwargs["d"]),
        "dead_neurons": lambda: tl_degen.reparam.add_dead_neurons(model, **kwargs),
        "invariance": lambda: tl_degen.check_invariance(
            model, tokens, ["resid_pre.1", "logits"], kwargs["transform"], progress=False),
    }
    with pytest.raises(TLDegenError, match=phrase):
        calls[verb]()


def test_non_adjacent_edge_is_a_site_error(fitted_relu):
    graph = fitted_relu[3]
    with pytest.raises(SiteError, match="not a layer pair"):
        graph.edge("resid_post.1", "resid_pre.1")


def test_a_model_with_nan_weights_is_refused_by_every_verb_taking_bases(fitted_relu, tmp_path):
    model, tokens, bases, graph = fitted_relu
    path = bases.save(tmp_path / "b.safetensors")
    broken = M.build("native_relu")
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(p for p in broken.parameters() if p.dim() == 2)[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="holds NaN or Inf"):
        BasisSet_load(path, broken)
    with pytest.raises(NonFiniteError, match="holds NaN or Inf"):
        tl_degen.ablation_curve(broken, tokens, bases, "resid_pre.1", "accuracy",
                                labels=LABELS, progress=False)
    with pytest.raises(NonFiniteError, match="holds NaN or Inf"):
        tl_degen.edge_ablation(broken, tokens, graph, "accuracy", labels=LABELS,
                               n_edges=[1], progress=False)


def test_hooks_left_on_the_model_are_named(fitted_relu):
    """A hook the user added and never removed changes what is measured: every verb refuses
    the model, naming the hook point as users write it."""
    model, tokens, bases, _ = fitted_relu
    model.add_hook("blocks.1.hook_resid_pre", lambda x, hook: 0 * x)
    try:
        with pytest.raises(ArgumentError, match=r"hooks are left on .*blocks\.1\.hook_resid_pre"
                                                r".*reset_hooks"):
            tl_degen.fit_bases(model, tokens, ["resid_pre.1"], progress=False)
        with pytest.raises(ArgumentError, match="reset_hooks"):
            tl_degen.ablation_curve(model, tokens, bases, "resid_pre.1", "accuracy",
                                    labels=LABELS, progress=False)
    finally:
        model.reset_hooks()
    with model.hooks([("blocks.1.hook_resid_pre", lambda x, hook: x)]):
        pass  # a context manager leaves nothing behind
    tl_degen.fit_bases(model, tokens, ["resid_pre.1"], method="pca", progress=False)


def _edit_basis_file(src, dst, edit_meta=None, edit_tensors=None):
    """A copy of a basis file with its header or tensors edited and its checksum dropped
    (a file written by other code)."""
    import json

    from safetensors.torch import load_file, save_file

    from tl_degen.io import CHECKSUM_KEY, read_safetensors

    header, _ = read_safetensors(src)
    tensors = load_file(str(src))
    header.pop(CHECKSUM_KEY)
    meta = json.loads(header["tl_degen"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={**header, "tl_degen": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("edit_meta, edit_tensors, phrase", [
    (lambda m: m.update(version="1"), None, "format version '1'"),
    (lambda m: m.update(version=True), None, "format version True"),
    (None, lambda t: t.update({"resid_pre.1/C_pinv": t["resid_pre.1/C_pinv"].float()}),
     "resid_pre.1/C_pinv is stored as float32"),
    (None, lambda t: t["resid_pre.1/C"].view(-1).__setitem__(0, float("nan")),
     "resid_pre.1/C holds NaN or Inf"),
])
def test_edited_basis_files_are_refused(fitted_relu, tmp_path, edit_meta, edit_tensors, phrase):
    bases = fitted_relu[2]
    src = bases.save(tmp_path / "b.safetensors")
    path = _edit_basis_file(src, tmp_path / "edited.safetensors", edit_meta, edit_tensors)
    with pytest.raises(DataError, match=phrase):
        tl_degen.BasisSet.load(path)
    assert tl_degen.BasisSet.load(_edit_basis_file(src, tmp_path / "same.safetensors")
                                  )["resid_pre.1"].k == bases["resid_pre.1"].k


def BasisSet_load(path, model):
    return tl_degen.BasisSet.load(path, model)
