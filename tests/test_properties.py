"""Property tests (hypothesis): random valid inputs never raise a raw exception and give
results within their invariants; random invalid inputs always raise a
:class:`~tl_degen.TLDegenError` (never a raw torch/numpy/json error, never a number)."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tl_degen  # noqa: E402
from tests import models as M  # noqa: E402
from tl_degen import TLDegenError, checks  # noqa: E402
from tl_degen.basis import Threshold  # noqa: E402
from tl_degen.memory import _parse  # noqa: E402

FEW = settings(max_examples=25, deadline=None, derandomize=True)
MANY = settings(max_examples=200, deadline=None, derandomize=True)

# values that are not an integer here: bools, non-integral floats, NaN/Inf, text, containers
NOT_INTEGERS = st.one_of(
    st.booleans(), st.floats().filter(lambda x: not x.is_integer() if math.isfinite(x) else True),
    st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none(),
    st.just(torch.tensor(1.5)), st.just(torch.tensor(True)), st.just(torch.ones(2)))
NOT_NUMBERS = st.one_of(
    st.booleans(), st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
    st.text(max_size=5), st.none(), st.lists(st.floats(), min_size=1, max_size=2))


@MANY
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_integer_accepts_every_int_in_range_and_refuses_outside(value, bound):
    if value >= bound:
        assert checks.integer("n", value, minimum=bound) == value
    else:
        with pytest.raises(tl_degen.ArgumentError, match="n must be at least"):
            checks.integer("n", value, minimum=bound)
    assert checks.integer("n", torch.tensor(value)) == value


@MANY
@given(NOT_INTEGERS)
def test_integer_refuses_what_is_not_an_integer(value):
    with pytest.raises(tl_degen.ArgumentError, match="n must be an integer"):
        checks.integer("n", value)


@MANY
@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(0, 1e6))
def test_number_is_finite_and_in_range(value, minimum):
    if value >= minimum:
        assert checks.number("x", value, minimum=minimum) == value
    else:
        with pytest.raises(tl_degen.ArgumentError, match="x must be at least"):
            checks.number("x", value, minimum=minimum)


@MANY
@given(NOT_NUMBERS)
def test_number_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(tl_degen.ArgumentError, match="x must be a (finite )?number"):
        checks.number("x", value)


@MANY
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8))
def test_integers_refuse_repeats(values):
    if len(set(values)) == len(values):
        assert checks.integers("n_kept", values, minimum=0) == values
    else:
        with pytest.raises(tl_degen.ArgumentError, match="n_kept repeats"):
            checks.integers("n_kept", values, minimum=0)


@MANY
@given(st.one_of(st.floats(), st.booleans(), st.text(max_size=4), st.none(), st.integers()))
def test_threshold_is_a_cut_or_refused(value):
    try:
        t = Threshold.coerce(value)
    except TLDegenError:
        return
    assert 0 <= t.value < 1 and math.isfinite(t.value) and not isinstance(value, bool)
    lam = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert 0 <= t.cutoff(lam) < 3.0  # the largest eigenvalue is always kept


@MANY
@given(st.text(max_size=8))
def test_memory_budget_text_is_a_positive_size_or_refused(text):
    try:
        value = _parse(text)
    except TLDegenError as err:
        assert "TL_DEGEN_MEMORY_BUDGET" in str(err)
        return
    assert isinstance(value, int) and value >= 1


# ---------------------------------------------------------------------- verbs on a fitted model
@pytest.fixture(scope="module")
def fitted():
    model = M.build("native_relu")
    tokens = M.random_tokens(12, 5)
    labels = torch.zeros(12, dtype=torch.long)
    bases = tl_degen.fit_bases(model, tokens, ["resid_pre.1", "resid_post.1"], method="pca",
                               progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    return model, tokens, labels, bases, graph


@FEW
@given(data=st.data())
def test_prune_keeps_a_subset_or_refuses(fitted, data):
    graph = fitted[4]
    criterion = data.draw(st.sampled_from(["threshold", "top_k", "mass"]))
    value = data.draw({
        "threshold": st.one_of(st.floats(), st.booleans()),
        "top_k": st.one_of(st.integers(-3, 40), st.floats(0, 5), st.booleans()),
        "mass": st.one_of(st.floats(), st.booleans()),
    }[criterion])
    try:
        small = graph.prune(**{criterion: value})
    except TLDegenError:
        return
    for key, E in graph.edges.items():
        kept = small.edges[key]
        assert ((kept == 0) | (kept == E)).all()  # edges kept whole or dropped
        assert kept.sum() <= E.sum() + 1e-12


@FEW
@given(st.lists(st.integers(-2, 20), min_size=1, max_size=4))
def test_ablation_curve_is_a_fraction_or_refused(fitted, n_kept):
    model, tokens, labels, bases, _ = fitted
    try:
        curve = tl_degen.ablation_curve(model, tokens, bases, "resid_pre.1", "accuracy",
                                        labels=labels, n_kept=n_kept, progress=False)
    except TLDegenError:
        assert min(n_kept) < 0 or len(set(n_kept)) < len(n_kept) or max(n_kept) > bases[
            "resid_pre.1"].k
        return
    k = bases["resid_pre.1"].k
    assert all(0 <= v <= 1 for v in curve.values) and 0 <= curve.baseline <= 1
    curve_of = curve.as_dict()
    assert sorted(curve_of) == sorted(min(n, k) for n in n_kept) or sorted(curve_of) == sorted(
        n_kept)
    if k in curve_of:  # every direction kept: the model itself
        assert curve_of[k] == pytest.approx(curve.baseline, abs=1e-12)


@FEW
@given(st.lists(st.integers(0, 20), min_size=0, max_size=3))
def test_coordinates_round_trip_or_refuse(fitted, shape):
    b = fitted[3]["resid_pre.1"]
    acts = torch.randn(*shape, dtype=torch.float64) if shape else torch.tensor(1.0)
    try:
        coords = b.to_coords(acts)
    except TLDegenError:
        assert not shape or shape[-1] not in (b.d_site, b.d_site - 1)
        return
    assert coords.shape == (*shape[:-1], b.k)
    back = b.from_coords(coords)
    assert back.shape == (*shape[:-1], b.d_site)
