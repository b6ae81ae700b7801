"""Construction errors reach the user from every PyTorch entry point, naming the option."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_teaches_options

from boundguard.integrations.lightning import BoundGuard
from boundguard.integrations.pytorch_lightning import BoundGuard as PLBoundGuard
from boundguard.integrations.torch import watch

BAD = [
    ({"bounds": "prob"}, ValueError, ("bounds", "'prob'")),
    ({"bounds": (1, 0)}, ValueError, ("bounds", "lo < hi")),
    ({"bounds": (0, "1")}, TypeError, ("bounds",)),
    ({"on_violation": "stop"}, ValueError, ("on_violation", "'stop'", "halt")),
    ({"actions": {"nan_loss": "halt"}}, ValueError, ("actions", "'nan_loss'")),
    ({"actions": {"nonfinite_loss": "stop"}}, ValueError, ("actions", "'stop'")),
    ({"check_every_n_steps": 0}, ValueError, ("check_every_n_steps", ">= 1", "0")),
    ({"check_every_n_steps": 2.5}, TypeError, ("check_every_n_steps", "2.5")),
    ({"alerts_path": 3}, TypeError, ("alerts_path", "3")),
    ({"thresholds": {"loss_spike": {"factr": 3}}}, ValueError, ("thresholds", "factr")),
    ({"target_key": 1.5}, TypeError, ("target_key", "1.5")),
]


@pytest.mark.parametrize("make", [BoundGuard, PLBoundGuard, lambda **kw: watch(torch.nn.Linear(2, 1), **kw)],
                         ids=["lightning", "pytorch_lightning", "watch"])
@pytest.mark.parametrize("kwargs, exc, words", BAD, ids=[next(iter(b[0])) + str(i) for i, b in enumerate(BAD)])
def test_bad_option_is_named(make, kwargs, exc, words):
    with pytest.raises(exc) as info:
        make(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_log_stats_must_be_bool():
    with pytest.raises(TypeError, match="log_stats"):
        BoundGuard(log_stats="yes")


@pytest.mark.parametrize("make", [BoundGuard, PLBoundGuard], ids=["lightning", "pytorch_lightning"])
def test_unknown_keyword_teaches_the_valid_options(make):
    """Not Python's "__init__() got an unexpected keyword argument": the class, the option, the closest
    match and every valid option, as watch() says it."""
    assert_teaches_options(make, "BoundGuard")
    with pytest.raises(TypeError, match=r"unknown option 'colour'; valid options: bounds, "):  # no close match
        make(colour="red")
