"""The framework-free Monitor, driven through the Session as the adapters drive it: dedup, escalation,
the action policy, the JSON-lines files, warnings, and state round trips (state_dict / pickle / JSON)."""
from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

from boundguard import Alert, BoundGuardError, BoundGuardWarning, Bounds
from boundguard.alerts import SCHEMA_VERSION
from boundguard.config import Config
from boundguard.model_facts import ModelFacts, classify_loss
from boundguard.monitor import ESCALATE_AFTER, Monitor
from boundguard.session import Session
from boundguard.stats import COLUMNS, LOSS_COLUMN, neutral_row
from boundguard.surgery import BoundRecord

COL = {c: i for i, c in enumerate(COLUMNS)}


@dataclass
class Interval:
    """What an adapter measured over the steps up to ``step`` (from ``first_step`` when given, else from
    the step after the last check): per kind its element count and statistics, and the steps' losses."""

    step: int
    first_step: Optional[int] = None
    values: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    losses: tuple = ()


def snap(step, *, first_step=None, pred=None, target=None, input_rms=None, losses=(), pre=None, values=None):
    """An interval ending at ``step``. ``pred``/``target``/``pre`` are (min, max[, extra values])."""
    iv = Interval(step, first_step, losses=tuple(losses))
    for kind, spec in (("pred", pred), ("target", target), ("pre", pre)):
        if spec is None:
            continue
        lo, hi, *extra = spec
        iv.counts[kind] = 10
        iv.values.update({f"{kind}.min": lo, f"{kind}.max": hi, f"{kind}.finite": 10.0, **(extra[0] if extra else {})})
    if input_rms is not None:
        iv.counts["input"] = 10
        iv.values.update({"input.min": -input_rms, "input.max": input_rms, "input.finite": 10.0,
                          "input.sumsq": 10 * input_rms ** 2})
    iv.values.update(values or {})
    return iv


def out_of_range(step, **kw):
    return snap(step, pred=(-0.5, 1.5, {"pred.below": 2.0, "pred.above": 3.0}), **kw)


def check(m: Session, iv: Interval):
    """Count the steps up to the interval's last one, as an adapter does, and hand the session the rows
    (the statistics in the first, neutral values elsewhere, one loss per step)."""
    if iv.first_step is not None and iv.first_step > m.interval_start:
        if iv.first_step - 1 > m.step:
            m.count_steps(iv.first_step - 1 - m.step)
        m.restart_interval()
    if iv.step > m.step:
        m.count_steps(iv.step - m.step)
    n = m.step - m.interval_start + 1
    rows = np.tile(neutral_row(), (n, 1))
    for name, v in iv.values.items():
        rows[0, COL[name]] = v
    rows[: len(iv.losses), LOSS_COLUMN] = iv.losses
    return m.check(rows, iv.counts, [i < len(iv.losses) for i in range(n)])


class Model:
    """The adapter's side of a ``bound``: the planned bound goes on the layer ``fc``."""

    def insert_bound(self, record: BoundRecord) -> BoundRecord:
        return record.at("fc")

    def release(self) -> None:
        pass


def monitor(tmp_path=None, facts=None, **options) -> Session:
    options.setdefault("on_violation", "log")
    m = Session(Config(**options), Model(), write=tmp_path is not None)
    if tmp_path is not None:
        m.open(tmp_path / "alerts.jsonl")
    m.set_facts(facts or ModelFacts())
    return m


def strict_json(line):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


def read_lines(path):
    return [strict_json(l) for l in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------- dedup
def test_persisting_alert_is_recorded_once_and_counted():
    m = monitor(bounds=(0, 1))
    first = check(m, out_of_range(1))
    assert [d.alert.code for d in first] == ["output_out_of_range"]
    for step in (50, 100, 150):
        assert check(m, out_of_range(step, first_step=step - 49)) == []
    (a,) = m.alerts
    assert (a.code, a.severity, a.step, a.count, a.last_step) == ("output_out_of_range", "error", 1, 4, 150)
    # a clean interval does not add anything; a new code is a new alert
    check(m, snap(200, first_step=151, pred=(0.1, 0.9)))
    check(m, snap(250, first_step=201, losses=(math.nan,)))
    assert [a.code for a in m.alerts] == ["output_out_of_range", "nonfinite_loss"]


def test_warning_escalates_to_error_after_persisting():
    m = monitor(facts=ModelFacts(activation="identity", loss=classify_loss("mse_loss")), bounds=(0, 1))
    decisions = [check(m, snap(i)) for i in range(1, ESCALATE_AFTER + 3)]
    assert [len(d) for d in decisions] == [1] + [0] * (ESCALATE_AFTER - 2) + [1, 0, 0]
    warning, error = m.alerts
    assert (warning.code, warning.severity) == ("missing_output_activation", "warning")
    assert (error.code, error.severity, error.step) == ("missing_output_activation", "error", ESCALATE_AFTER)
    assert error.details["escalated_from"] == "warning"
    assert "escalated" in error.message
    assert error.count == ESCALATE_AFTER + 2  # counting continues on the escalated alert


# ----------------------------------------------------------------------------------------- policy
LOSS_FACTS = ModelFacts(activation="identity", loss=classify_loss("mse_loss"))


def _plateau_monitor(**options):
    m = monitor(**options)
    h = m.monitor.history
    h.window.extend([1.0] * 20)
    h.initial_level, h.best_level, h.best_step, h.steps_seen = 1.0, 1.0, 1, 5000
    return m, snap(5000, first_step=4951)


@pytest.mark.parametrize("options,inserted,scenario,expected", [
    # info alerts are only recorded, whatever on_violation says
    ({"on_violation": "raise"}, False, "plateau", "log"),
    ({"on_violation": "halt", "actions": {"loss_plateau": "log"}}, False, "plateau", "log"),
    # on_violation applies to warning and above
    ({"on_violation": "log"}, False, "range", "log"),
    ({"on_violation": "warn"}, False, "range", "warn"),
    ({"on_violation": "halt"}, False, "range", "halt"),
    ({"on_violation": "raise"}, False, "range", "raise"),
    ({"on_violation": "bound"}, False, "range", "bound"),
    # per-code actions override on_violation
    ({"on_violation": "log", "actions": {"output_out_of_range": "raise"}}, False, "range", "raise"),
    ({"on_violation": "raise", "actions": {"output_out_of_range": "log"}}, False, "range", "log"),
    ({"on_violation": "log", "actions": {"nonfinite_loss": "halt"}}, False, "range", "log"),
    # bound only answers range codes, and only once
    ({"on_violation": "bound"}, False, "nan_loss", "warn"),
    ({"on_violation": "bound"}, True, "range", "warn"),
])
def test_action_policy(options, inserted, scenario, expected):
    if scenario == "plateau":
        m, s = _plateau_monitor(**options)
        code = "loss_plateau"
    else:
        m = monitor(bounds=(0, 1), **options)
        s = out_of_range(1) if scenario == "range" else snap(1, losses=(math.nan,))
        code = "output_out_of_range" if scenario == "range" else "nonfinite_loss"
    if inserted:
        m.monitor.record_bound(BoundRecord("sigmoid", module="fc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check(m, s)
        except BoundGuardError as err:
            assert expected == "raise" and err.alert.code == code
    (a,) = [a for a in m.alerts if a.code == code]
    assert a.action == expected
    assert m.should_stop is (expected == "halt") and bool(m.records) is (expected == "bound" or inserted)


@pytest.mark.parametrize("action,warns", [("log", False), ("warn", True), ("halt", True), ("bound", True),
                                          ("raise", False)])
def test_boundguard_warning_is_emitted_for_warn(action, warns):
    m = monitor(bounds=(0, 1), on_violation=action)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check(m, out_of_range(1))
        except BoundGuardError:
            assert action == "raise"
    ours = [w for w in caught if issubclass(w.category, BoundGuardWarning)]
    assert bool(ours) is warns
    if warns:
        assert "output_out_of_range" in str(ours[0].message)


def test_warn_goes_through_pytest_warns():
    m = monitor(bounds=(0, 1), on_violation="warn")
    with pytest.warns(BoundGuardWarning, match="output_out_of_range"):
        check(m, out_of_range(1))


def test_alerts_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="boundguard")
    m = monitor(bounds=(0, 1))
    check(m, out_of_range(1))
    assert any(r.levelno == logging.ERROR and "output_out_of_range" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- files
def test_alerts_file_is_json_lines_flushed_per_alert(tmp_path):
    m = monitor(tmp_path, bounds=(0, 1))
    path = tmp_path / "alerts.jsonl"
    check(m, out_of_range(1))
    lines = read_lines(path)  # read while the file is still open: flushed per line
    assert [r["code"] for r in lines] == ["output_out_of_range"]
    check(m, snap(2, losses=(math.nan,)))
    lines = read_lines(path)
    assert [r["code"] for r in lines] == ["output_out_of_range", "nonfinite_loss"]
    for r in lines:
        assert r["schema"] == SCHEMA_VERSION and r["type"] == "alert" and r["event"] == "new"
        assert {"code", "severity", "step", "epoch", "where", "message", "fix", "value", "threshold"} <= set(r)
    check(m, out_of_range(3))
    m.finish()
    summary = read_lines(path)[-1]
    assert (summary["event"], summary["code"], summary["count"]) == ("summary", "output_out_of_range", 2)


def test_nonfinite_numbers_are_written_as_strings(tmp_path):
    m = monitor(tmp_path, bounds=(0, 1))
    # a spike against a zero running level is measured as a rise (no infinite ratio); a NaN minimum and
    # an infinite maximum of the predictions go in the details
    m.monitor.history.window.extend([0.0] * 20)
    check(m, snap(21, first_step=21, losses=(1.0,),
                 pred=(math.nan, math.inf, {"pred.finite": 9.0, "pred.above": 3.0})))
    m.close()
    records = {r["code"]: r for r in read_lines(tmp_path / "alerts.jsonl")}
    assert records["loss_spike"]["value"] == 1.0
    assert records["output_out_of_range"]["details"]["min"] == "nan"
    assert records["output_out_of_range"]["details"]["max"] == "inf"
    assert "nonfinite_output" in records


def test_stats_file_beside_alerts(tmp_path):
    m = monitor(tmp_path, bounds=(0, 1))
    assert m.monitor.stats_path == tmp_path / "stats.jsonl"
    check(m, snap(1, pred=(0.2, 0.8), losses=(0.5,)))
    check(m, snap(2, pred=(math.nan, 0.8, {"pred.finite": 9.0}), losses=(math.inf,)))
    m.close()
    recs = read_lines(tmp_path / "stats.jsonl")
    assert [r["type"] for r in recs] == ["run", "stats", "stats"]
    assert all(r["schema"] == SCHEMA_VERSION for r in recs)
    assert recs[1]["step"] == 1 and recs[1]["pred.max"] == 0.8 and recs[1]["loss.mean"] == 0.5
    assert recs[2]["pred.nonfinite"] == 1 and recs[2]["loss.nonfinite"] == 1


def test_stats_file_name_follows_a_custom_alerts_name(tmp_path):
    m = Monitor(Config(), write=True)
    m.open_files(tmp_path / "sub" / "run7.jsonl")
    assert m.stats_path == tmp_path / "sub" / "run7.stats.jsonl"


def test_no_files_without_write(tmp_path):
    m = Session(Config(bounds=(0, 1), on_violation="log"), write=False)
    m.open(tmp_path / "alerts.jsonl")
    check(m, out_of_range(1))
    m.finish()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- state
def _busy_monitor(tmp_path=None):
    """A monitor with inferred bounds, history, deduplicated and escalated alerts and a note."""
    m = monitor(tmp_path, facts=ModelFacts(pred_where="fc", activation="identity", loss=classify_loss("mse_loss")),
                bounds="auto")
    m.observe_targets(0.0, 1.0)
    assert m.bounds == Bounds.probability().as_inferred()
    m.note("targets", "could not find", "pass target_key=", step=1)
    for i in range(1, 8):
        check(m, out_of_range(10 * i, first_step=10 * i - 9, target=(0.0, 1.0),
                             losses=[1.0 / i] * 10, pre=(-3.0, 3.0 * i)))
    codes = [a.code for a in m.alerts]
    assert codes.count("missing_output_activation") == 2  # warning, then its escalation
    assert "output_out_of_range" in codes and "probe_incomplete" in codes
    return m


def _assert_same_state(a: Session, b: Session):
    assert b.alerts == a.alerts
    assert b.monitor.history.to_dict() == a.monitor.history.to_dict()
    assert b.bounds == a.bounds and b.bounds.inferred
    assert b.facts == a.facts
    assert b.monitor.notes_reported == a.monitor.notes_reported
    assert b.records == a.records and b.step == a.step


@pytest.mark.parametrize("transport", ["direct", "pickle", "json"])
def test_state_dict_round_trip(transport):
    m = _busy_monitor()
    m.monitor.record_bound(BoundRecord("sigmoid", 0.0, 1.0, -1, 10, module="fc"))
    state = m.state_dict()
    if transport == "pickle":
        state = pickle.loads(pickle.dumps(state))
    elif transport == "json":
        state = json.loads(json.dumps(state, allow_nan=False))
    restored = monitor(bounds="auto")
    restored.load_state_dict(state)
    _assert_same_state(m, restored)
    # the restored monitor goes on deduplicating exactly as the original does
    nxt = out_of_range(80, first_step=71, target=(0.0, 1.0), losses=[0.1] * 10, pre=(-3.0, 3.0))
    assert [d.alert.code for d in check(m, copy.deepcopy(nxt))] == [d.alert.code for d in check(restored, nxt)]
    _assert_same_state(m, restored)
    assert restored.note("targets", "again", "fix", step=80) is None  # notes are not repeated after resume


def test_monitor_pickles_with_open_files(tmp_path):
    m = _busy_monitor(tmp_path).monitor
    clone: Monitor = pickle.loads(pickle.dumps(m))
    assert clone.alerts == m.alerts and clone.history.to_dict() == m.history.to_dict() and clone.bounds == m.bounds
    assert clone.facts == m.facts and clone.notes_reported == m.notes_reported and clone.inserted == m.inserted
    m.close()


def test_alert_record_round_trip():
    a = Alert("loss_spike", "warning", 12, 1, "loss", "jumped", "clip", 5.5, 4.0, count=3, last_step=40,
              bounds_inferred=True, action="warn", details={"spike_step": 12})
    rec = a.to_record()
    assert rec["schema"] == SCHEMA_VERSION and rec["type"] == "alert"
    assert Alert.from_record(rec) == a
    assert Alert.from_record(json.loads(json.dumps(rec, allow_nan=False))) == a
    assert Alert.from_record({**rec, "unknown_future_field": 1}) == a


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_alert_record_is_strict_json_for_nonfinite_values(value):
    rec = Alert("loss_spike", "warning", 1, None, "loss", "m", "f", value, value).to_record()
    strict_json(json.dumps(rec, allow_nan=False))
    assert rec["value"] == rec["threshold"] == ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf")


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_alert_from_record_restores_nonfinite_numbers(value):
    a = Alert("loss_spike", "warning", 1, None, "loss", "m", "f", value, 4.0)
    b = Alert.from_record(json.loads(json.dumps(a.to_record())))
    assert b.value == value and isinstance(b.value, float)


def test_boundguard_error_pickles_with_its_alert():
    alert = Alert("nonfinite_loss", "critical", 3, 0, "loss", "NaN", "lower lr", 1.0, 0.0)
    err = pickle.loads(pickle.dumps(BoundGuardError(alert)))
    assert isinstance(err, BoundGuardError) and err.alert == alert
    assert str(err) == str(BoundGuardError(alert)) and "nonfinite_loss" in str(err)


# ----------------------------------------------------------------------------------------- auto bounds
def test_auto_bounds_follow_the_targets():
    m = monitor(facts=ModelFacts(activation="unknown", loss=classify_loss("mse_loss")), bounds="auto")
    assert m.bounds is None  # nothing seen yet
    check(m, snap(1, target=(0.0, 1.0)))
    assert m.bounds == Bounds.probability().as_inferred()
    check(m, snap(2, target=(0.0, 5.0)))  # a later target outside [0, 1] revokes (0, 1)
    assert m.bounds is None


def test_auto_bounds_for_class_indices_are_a_distribution():
    m = monitor(facts=ModelFacts(activation="identity", loss=classify_loss("cross_entropy"), target_integer=True),
                bounds="auto")
    m.observe_targets(0.0, 9.0)
    assert m.bounds == Bounds.distribution().as_inferred()


def test_alerts_against_inferred_bounds_say_so():
    m = monitor(facts=ModelFacts(activation="unknown", loss=classify_loss("mse_loss")), bounds="auto")
    (d,) = check(m, snap(1, target=(0.0, 1.0), pred=(-0.5, 1.5, {"pred.below": 2.0, "pred.above": 3.0})))
    a = d.alert
    assert (a.code, a.severity, a.bounds_inferred) == ("output_out_of_range", "warning", True)
    assert "inferred" in a.message


def test_alerts_take_the_catalogue_severity():
    from boundguard.catalogue import CATALOGUE

    m = monitor(bounds=(0, 1))
    decisions = check(m, out_of_range(1, losses=(math.nan,), input_rms=1.0, values={"input.finite": 9.0}))
    assert {d.alert.code for d in decisions} == {"output_out_of_range", "nonfinite_loss", "nonfinite_input"}
    for d in decisions:
        assert d.alert.severity == CATALOGUE[d.alert.code].severity
        assert d.alert.fix == CATALOGUE[d.alert.code].fix


def test_fresh_state_round_trips_through_json():
    """Before any target is seen the history holds +-inf: json (not strict JSON) carries it."""
    m = monitor(bounds="auto")
    restored = monitor(bounds="auto")
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert restored.monitor.history.to_dict() == m.monitor.history.to_dict()
    assert restored.alerts == [] and restored.bounds is None
