"""Bounds (presets, resolution, the "auto" rule), activation inference against numpy, and loss families."""
from __future__ import annotations

import math

import numpy as np
import pytest

from boundguard import Bounds
from boundguard.bounds import PRESETS, infer_bounds, resolve_bounds
from boundguard.model_facts import ModelFacts, activation_range, classify_loss, infer_activation


# ----------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("name,lo,hi,kind", [
    ("probability", 0.0, 1.0, "interval"),
    ("symmetric", -1.0, 1.0, "interval"),
    ("distribution", 0.0, 1.0, "distribution"),
])
def test_presets(name, lo, hi, kind):
    b = resolve_bounds(name)
    assert (b.lo, b.hi, b.kind, b.inferred) == (lo, hi, kind, False)
    assert PRESETS[name]() == b


@pytest.mark.parametrize("spec,expected", [
    ("auto", "auto"),
    (None, None),
    ((0, 1), Bounds(0.0, 1.0)),
    ([-2, 3.5], Bounds(-2.0, 3.5)),
    ((0, math.inf), Bounds(0.0, math.inf)),
    (Bounds(2, 5), Bounds(2.0, 5.0)),
])
def test_resolve_bounds_accepts(spec, expected):
    assert resolve_bounds(spec) == expected


@pytest.mark.parametrize("spec,exc,given", [
    ("probabilty", ValueError, "'probabilty'"),
    ("", ValueError, "''"),
    ((1, 0), ValueError, "(1, 0)"),
    ((0, 0), ValueError, "(0, 0)"),
    ((0, float("nan")), ValueError, "nan"),
    ((0, 1, 2), ValueError, "(0, 1, 2)"),
    ((0,), ValueError, "(0,)"),
    (("0", 1), TypeError, "('0', 1)"),
    ((True, 2), TypeError, "(True, 2)"),
    ((0, None), TypeError, "(0, None)"),
    (5, TypeError, "5"),
    ({"lo": 0, "hi": 1}, TypeError, "{'lo': 0, 'hi': 1}"),
])
def test_resolve_bounds_errors_name_the_option(spec, exc, given):
    with pytest.raises(exc) as info:
        resolve_bounds(spec)
    msg = str(info.value)
    assert msg.startswith("bounds")
    assert given in msg


@pytest.mark.parametrize("args,exc", [
    ((1.0, 0.0), ValueError),
    ((0.0, 1.0, "box"), ValueError),
    ((math.nan, 1.0), TypeError),
    (("0", 1.0), TypeError),
    ((-1.0, 1.0, "distribution"), ValueError),
])
def test_bounds_validates(args, exc):
    with pytest.raises(exc):
        Bounds(*args)


def test_bounds_dict_round_trip_and_describe():
    for b in (Bounds(2, 5), Bounds.distribution().as_inferred(), Bounds.symmetric()):
        assert Bounds.from_dict(b.to_dict()) == b
    assert "inferred" in Bounds.probability().as_inferred().describe()
    assert "inferred" not in Bounds.probability().describe()
    assert Bounds(0, math.inf).finite is False


# (target_min, target_max, integer, onehot, multiclass loss) -> expected
@pytest.mark.parametrize("tmin,tmax,integer,onehot,multiclass,expected", [
    (0.0, 1.0, False, False, False, Bounds.probability()),  # binary / continuous in [0, 1]
    (0.2, 0.7, False, False, False, Bounds.probability()),
    (0.0, 1.0, True, False, False, Bounds.probability()),  # integer 0/1 with a binary loss
    (0.0, 9.0, True, False, True, Bounds.distribution()),  # class indices, cross-entropy
    (0.0, 1.0, True, False, True, Bounds.distribution()),  # two classes as indices
    (0.0, 1.0, False, True, True, Bounds.distribution()),  # one-hot with a multi-class loss
    (0.0, 9.0, True, False, False, None),  # class indices with a regression loss
    (-1.0, 1.0, False, False, False, None),
    (0.0, 2.5, False, False, False, None),
    (math.inf, -math.inf, False, False, False, None),  # no targets seen
])
def test_infer_bounds_auto_rule(tmin, tmax, integer, onehot, multiclass, expected):
    b = infer_bounds(tmin, tmax, target_integer=integer, target_onehot=onehot, multiclass_loss=multiclass)
    if expected is None:
        assert b is None
    else:
        assert b.inferred is True
        assert (b.lo, b.hi, b.kind) == (expected.lo, expected.hi, expected.kind)


# ----------------------------------------------------------------------------------------- activations
RNG = np.random.default_rng(0)
Z2 = RNG.normal(0, 2, size=(8, 5))
Z3 = RNG.normal(0, 2, size=(3, 4, 5))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("z,p,name,params", [
    (Z2, Z2.copy(), "identity", {}),
    (Z2, _sigmoid(Z2), "sigmoid", {}),
    (Z2, np.tanh(Z2), "tanh", {}),
    (Z2, _softmax(Z2, 1), "softmax", {"dim": 1}),
    (Z2, _softmax(Z2, 0), "softmax", {"dim": 0}),
    (Z3, _softmax(Z3, 2), "softmax", {"dim": 2}),
    (Z3, _softmax(Z3, 1), "softmax", {"dim": 1}),
    (Z3, _softmax(Z3, 0), "softmax", {"dim": 0}),
    (Z2[0], _softmax(Z2[0], 0), "softmax", {"dim": 0}),
    (Z2, np.log(_softmax(Z2, 1)), "log_softmax", {"dim": 1}),
    (Z3, np.log(_softmax(Z3, 0)), "log_softmax", {"dim": 0}),
    (Z2, np.clip(Z2, -1, 1), "clamp", {"lo": -1.0, "hi": 1.0}),
    (Z2, np.maximum(Z2, -0.5), "clamp", {"lo": -0.5, "hi": None}),
    (Z2, np.minimum(Z2, 0.5), "clamp", {"lo": None, "hi": 0.5}),
    (Z2, np.maximum(Z2, 0), "relu", {}),
    (Z2, 2 + 3 * _sigmoid(Z2), "scaled_sigmoid", {"lo": 2.0, "hi": 5.0}),
    (Z2, -10 + 20 * _sigmoid(Z2), "scaled_sigmoid", {"lo": -10.0, "hi": 10.0}),
    (Z2, 0.5 + 2 * np.tanh(Z2), "scaled_tanh", {"lo": -1.5, "hi": 2.5}),
    (Z2, Z2 ** 2 + 0.3, "unknown", {}),
    (Z2, np.sin(3 * Z2), "unknown", {}),
    (Z2, Z2[:4], "unknown", {}),  # sizes differ
    (np.zeros(0), np.zeros(0), "unknown", {}),
])
def test_infer_activation_against_numpy(z, p, name, params):
    got, got_params = infer_activation(z, p)
    assert got == name
    assert got_params == pytest.approx(params) if params else got_params == {}


def test_infer_activation_float32_rounding():
    z = Z2.astype(np.float32)
    assert infer_activation(z, _sigmoid(z).astype(np.float32))[0] == "sigmoid"
    assert infer_activation(z, _softmax(z, 1).astype(np.float32)) == ("softmax", {"dim": 1})


def test_infer_activation_ignores_nonfinite_pairs_in_1d():
    z = np.array([-3.0, -1.0, 0.0, np.nan, 1.0, 3.0])
    assert infer_activation(z, _sigmoid(z))[0] == "sigmoid"


@pytest.mark.parametrize("name,params,rng", [
    ("sigmoid", {}, (0.0, 1.0)),
    ("softmax", {"dim": 1}, (0.0, 1.0)),
    ("tanh", {}, (-1.0, 1.0)),
    ("clamp", {"lo": -1.0, "hi": None}, (-1.0, math.inf)),
    ("scaled_sigmoid", {"lo": 2.0, "hi": 5.0}, (2.0, 5.0)),
    ("relu", {}, (0.0, math.inf)),
    ("log_softmax", {}, (-math.inf, 0.0)),
    ("identity", {}, None),
    ("unknown", {}, None),
])
def test_activation_range(name, params, rng):
    assert activation_range(name, params) == rng
    facts = ModelFacts(activation=name, activation_params=params)
    assert facts.output_bounded == (rng is not None and all(math.isfinite(x) for x in rng))


# ----------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name,from_logits,family,multiclass,link", [
    # torch.nn.functional names
    ("mse_loss", False, "regression", False, None),
    ("l1_loss", False, "regression", False, None),
    ("smooth_l1_loss", False, "regression", False, None),
    ("huber_loss", False, "regression", False, None),
    ("binary_cross_entropy", False, "probability", False, None),
    ("binary_cross_entropy_with_logits", False, "logits", False, "sigmoid"),
    ("cross_entropy", False, "logits", True, "softmax"),
    ("nll_loss", False, "log_probs", True, "exp"),
    ("kl_div", False, "log_probs", True, "exp"),
    # Keras names, canonical, short and class-style, with and without from_logits
    ("mse", False, "regression", False, None),
    ("MeanSquaredError", False, "regression", False, None),
    ("mae", False, "regression", False, None),
    ("mean_squared_error", True, "regression", False, None),  # from_logits does not touch regression
    ("binary_crossentropy", False, "probability", False, None),
    ("binary_crossentropy", True, "logits", False, "sigmoid"),
    ("BinaryCrossentropy", True, "logits", False, "sigmoid"),
    ("categorical_crossentropy", False, "probability", True, None),
    ("categorical_crossentropy", True, "logits", True, "softmax"),
    ("SparseCategoricalCrossentropy", False, "probability", True, None),
    ("sparse_categorical_crossentropy", True, "logits", True, "softmax"),
    ("binary_focal_crossentropy", True, "logits", False, "sigmoid"),
    ("hinge", False, "other", False, None),
])
def test_classify_loss(name, from_logits, family, multiclass, link):
    info = classify_loss(name, from_logits=from_logits)
    assert (info.family, info.multiclass) == (family, multiclass)
    if family == "logits":  # the link the loss applies itself
        assert info.link == link
    assert info.consumes_logits == (family == "logits")


@pytest.mark.parametrize("name", [None, ""])
def test_classify_loss_unknown_name(name):
    assert classify_loss(name) is None


def test_model_facts_round_trip():
    f = ModelFacts(pred_where="head", activation="clamp", activation_params={"lo": 0.0, "hi": None},
                   loss=classify_loss("cross_entropy"), target_integer=True, classes=3, notes=[["loss", "x"]])
    assert ModelFacts.from_dict(f.to_dict()) == f
