"""Every bad option value is rejected at construction with an error naming the option, what was
expected and what was given (contract: "Invalid values raise ValueError/TypeError at construction")."""
from __future__ import annotations

from pathlib import Path

import pytest

from boundguard import Bounds
from boundguard.catalogue import CODES, RANGE_CODES
from boundguard.config import ACTIONS, INFO_ONLY, OPTIONS, Config

DIR = object()  # placeholder: replaced by an existing directory in the test

# option, bad value, exception, words the message must contain (option, expectation, given value)
BAD = [
    ("bounds", "probabilty", ValueError, ["bounds", "'auto'", "'probabilty'"]),
    ("bounds", (1, 0), ValueError, ["bounds", "lo < hi", "(1, 0)"]),
    ("bounds", (0, 1, 2), ValueError, ["bounds", "(lo, hi)", "(0, 1, 2)"]),
    ("bounds", ("a", 1), TypeError, ["bounds", "two numbers", "('a', 1)"]),
    ("bounds", 1, TypeError, ["bounds", "(lo, hi)", "1"]),
    ("on_violation", "explode", ValueError, ["on_violation", "'halt'", "'explode'"]),
    ("on_violation", "WARN", ValueError, ["on_violation", "'warn'", "'WARN'"]),
    ("on_violation", None, ValueError, ["on_violation", "'log'", "None"]),
    ("actions", {"nope": "log"}, ValueError, ["actions", "nonfinite_loss", "'nope'"]),
    ("actions", {"nonfinite_loss": "explode"}, ValueError, ["actions", "'nonfinite_loss'", "'halt'", "'explode'"]),
    ("actions", {"nonfinite_loss": 3}, ValueError, ["actions", "'halt'", "3"]),
    ("actions", ["nonfinite_loss"], TypeError, ["actions", "dict", "list"]),
    ("actions", "halt", TypeError, ["actions", "dict", "str"]),
    # actions that can never act: info-only codes, and bound for a code a bound cannot answer
    ("actions", {"probe_incomplete": "halt"}, ValueError, ["actions['probe_incomplete']", "never act", "'log'"]),
    ("actions", {"loss_plateau": "raise"}, ValueError, ["actions['loss_plateau']", "never act", "info"]),
    ("actions", {"nonfinite_loss": "bound"}, ValueError, ["actions['nonfinite_loss']", "never act",
                                                          "output_out_of_range"]),
    ("check_every_n_steps", 0, ValueError, ["check_every_n_steps", ">= 1", "0"]),
    ("check_every_n_steps", -1, ValueError, ["check_every_n_steps", ">= 1", "-1"]),
    ("check_every_n_steps", 1.5, TypeError, ["check_every_n_steps", "int", "1.5"]),
    ("check_every_n_steps", True, TypeError, ["check_every_n_steps", "int", "True"]),
    ("check_every_n_steps", "5", TypeError, ["check_every_n_steps", "int", "'5'"]),
    ("check_every_n_steps", None, TypeError, ["check_every_n_steps", "int", "None"]),
    ("alerts_path", 3, TypeError, ["alerts_path", "file path", "3"]),
    ("alerts_path", "", ValueError, ["alerts_path", "file path", "empty string"]),
    ("alerts_path", DIR, ValueError, ["alerts_path", "file path", "directory"]),
    ("thresholds", {"nope": {"factor": 2}}, ValueError, ["thresholds", "loss_spike", "nope"]),
    ("thresholds", {"loss_spike": {"bogus": 2}}, ValueError, ["thresholds", "factor", "bogus"]),
    ("thresholds", 5, TypeError, ["thresholds", "dict", "5"]),
    ("input_key", 1.5, TypeError, ["input_key", "int", "1.5"]),
    ("input_key", ["x"], TypeError, ["input_key", "str", "['x']"]),
    ("target_key", True, TypeError, ["target_key", "int", "True"]),
    ("target_key", b"y", TypeError, ["target_key", "str", "b'y'"]),
]


@pytest.mark.parametrize("option,value,exc,words", [pytest.param(*b, id=f"{b[0]}={b[1]!r}") for b in BAD])
def test_bad_option_is_rejected_with_a_teaching_message(option, value, exc, words, tmp_path):
    if value is DIR:
        value = tmp_path
        words = words + [str(tmp_path)]
    with pytest.raises(exc) as info:
        Config(**{option: value})
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} missing from {msg!r}"


# A threshold whose value is not a number is a bad option value as well: the error names the option.
@pytest.mark.parametrize("value", [{"loss_spike": 5}, {"loss_spike": {"factor": "big"}},
                                   {"loss_spike": {"factor": None}}])
def test_malformed_threshold_values_name_the_option(value):
    with pytest.raises((ValueError, TypeError), match="thresholds"):
        Config(thresholds=value)


@pytest.mark.parametrize("kwargs", [
    {},
    {"bounds": None},
    {"bounds": "distribution"},
    {"bounds": Bounds(2, 5)},
    {"bounds": [0, 1]},
    {"on_violation": "bound", "actions": {"nonfinite_loss": "halt", "loss_plateau": "log"}},
    {"actions": {c: ("bound" if c in RANGE_CODES else ("halt" if a == "bound" else a))
                 for c, a in zip(CODES, ACTIONS * 3) if c not in INFO_ONLY}},
    {"actions": {c: "log" for c in INFO_ONLY}},
    {"check_every_n_steps": 1},
    {"alerts_path": "run/alerts.jsonl"},
    {"thresholds": {"loss_spike": {"factor": 8}, "loss_plateau": {"patience": 10}}},
    {"input_key": 0, "target_key": "label"},
])
def test_good_options_are_accepted(kwargs):
    """Each option given is kept (a bounds spec as the Bounds it names, a path as a Path); the others keep
    their defaults."""
    cfg = Config(**kwargs)
    want = {name: getattr(Config(), name) for name in OPTIONS}
    want.update(kwargs)
    if "alerts_path" in kwargs:
        want["alerts_path"] = Path(kwargs["alerts_path"])
    if kwargs.get("bounds") == "distribution":
        want["bounds"] = Bounds(0.0, 1.0, "distribution")
    elif isinstance(kwargs.get("bounds"), list):
        want["bounds"] = Bounds(*map(float, kwargs["bounds"]))
    assert {name: getattr(cfg, name) for name in OPTIONS} == want


def test_defaults_and_normalisation(tmp_path):
    cfg = Config()
    assert (cfg.bounds, cfg.on_violation, cfg.actions, cfg.check_every_n_steps, cfg.alerts_path) == (
        "auto", "warn", None, 50, None)
    cfg = Config(bounds=(0, 1), alerts_path=str(tmp_path / "a.jsonl"), actions={"nonfinite_loss": "halt"})
    assert cfg.bounds == Bounds(0.0, 1.0)
    assert isinstance(cfg.alerts_path, Path)
    assert cfg.action_for("nonfinite_loss") == "halt"
    assert cfg.action_for("loss_spike") == "warn"
    assert cfg.describe()["bounds"] == {"lo": 0.0, "hi": 1.0, "kind": "interval", "inferred": False}


def test_actions_dict_is_copied():
    actions = {"nonfinite_loss": "halt"}
    cfg = Config(actions=actions)
    actions["nonfinite_loss"] = "log"
    assert cfg.action_for("nonfinite_loss") == "halt"


@pytest.mark.parametrize("entry", ["watch()", "BoundGuard()"])
def test_unknown_option_names_the_entry_point_and_the_valid_options(entry):
    with pytest.raises(TypeError) as info:
        Config.from_options(entry, {"check_every": 10})
    msg = str(info.value)
    for w in (entry, "'check_every'", "did you mean 'check_every_n_steps'", "bounds", "on_violation", "alerts_path"):
        assert w in msg, f"{w!r} missing from {msg!r}"
