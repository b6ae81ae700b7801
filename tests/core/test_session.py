"""The run lifecycle the adapters share (``boundguard.session``), tested with a fake adapter: cadence,
one bound per run decided in the core, surgery that fails, guarded hooks, state, read-only views."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from boundguard import BoundGuardError, BoundGuardWarning, Bounds
from boundguard.config import Config
from boundguard.model_facts import ModelFacts, classify_loss
from boundguard.session import CountingPlan, Session, guarded
from boundguard.stats import COLUMNS, merge_rows, neutral_row
from boundguard.surgery import BoundRecord, CannotBound, plan_bound


class FakeAdapter:
    """Records what the session asks; ``fail`` makes surgery impossible."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.inserted, self.released = fail, [], 0

    def insert_bound(self, record: BoundRecord) -> BoundRecord:
        if self.fail:
            raise CannotBound("the output layer was not located.", "Add the output activation yourself.")
        placed = record.at("fc", ())
        self.inserted.append(placed)
        return placed

    def release(self) -> None:
        self.released += 1


def out_of_range_rows():
    """One step of a raw linear head: 5 of 10 predictions outside [0, 1]."""
    row = neutral_row()
    col = {c: i for i, c in enumerate(COLUMNS)}
    row[col["pred.min"]], row[col["pred.max"]], row[col["pred.finite"]] = -0.5, 1.5, 10
    row[col["pred.below"]], row[col["pred.above"]] = 2, 3
    return row[None], {"pred": 10}, [False]


def session(tmp_path, adapter=None, **options) -> Session:
    options.setdefault("alerts_path", tmp_path / "alerts.jsonl")
    s = Session(Config(**options), adapter)
    s.open()
    s.set_facts(ModelFacts(pred_where="fc", pre_where="fc", activation="identity", loss=classify_loss("mse_loss")))
    return s


def file_actions(path) -> dict[str, str]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["code"]: r["action"] for r in recs if r.get("type") == "alert" and r["code"] != "probe_incomplete"}


def test_cadence_first_step_and_every_n_steps_crossed():
    s = Session(Config(check_every_n_steps=5, on_violation="log"), write=False)
    due = [s.count_steps() for _ in range(11)]
    assert [i + 1 for i, d in enumerate(due) if d] == [1, 5, 10]
    s2 = Session(Config(check_every_n_steps=5, on_violation="log"), write=False)
    assert [s2.count_steps(3) for _ in range(4)] == [True, True, False, True]  # steps 3, 6, 9, 12
    assert s2.step == 12


def test_two_range_alerts_at_one_check_one_bound_and_file_agrees_with_memory(tmp_path):
    adapter = FakeAdapter()
    s = session(tmp_path, adapter, bounds=(0, 1), on_violation="bound")
    s.count_steps()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        decisions = s.check(*out_of_range_rows())
    codes = {d.alert.code: d.action for d in decisions}
    assert codes == {"output_out_of_range": "bound", "missing_output_activation": "warn"}
    assert {a.code: a.action for a in s.alerts if a.code in codes} == codes
    s.finish()
    assert file_actions(tmp_path / "alerts.jsonl") == codes
    assert len(adapter.inserted) == 1 and s.facts.activation == "sigmoid"
    assert s.bounds_inserted == [adapter.inserted[0].to_dict()]


def test_surgery_that_fails_becomes_warn_with_a_note_in_memory_and_file(tmp_path):
    s = session(tmp_path, FakeAdapter(fail=True), bounds=(0, 1), on_violation="bound")
    s.count_steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.check(*out_of_range_rows())
    assert s.bounds_inserted == []
    assert {a.code: a.action for a in s.alerts if a.code == "output_out_of_range"} == {"output_out_of_range": "warn"}
    notes = [a for a in s.alerts if a.code == "probe_incomplete"]
    assert [n.where for n in notes] == ["bound"] and "not located" in notes[0].message
    s.finish()
    assert file_actions(tmp_path / "alerts.jsonl")["output_out_of_range"] == "warn"


def test_infinite_bounds_cannot_be_bounded(tmp_path):
    assert plan_bound(Bounds(0.0, math.inf), step=1) is None
    s = session(tmp_path, FakeAdapter(), bounds=(0, math.inf), on_violation="bound")
    s.count_steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.check(*out_of_range_rows())
    assert s.bounds_inserted == [] and any(a.where == "bound" for a in s.alerts)


def test_bounds_inserted_are_copies(tmp_path):
    s = session(tmp_path, FakeAdapter(), bounds=(0, 1), on_violation="bound")
    s.count_steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.check(*out_of_range_rows())
    view = s.bounds_inserted
    view[0]["kind"] = "tanh"
    view.append({"kind": "softmax"})
    assert [r["kind"] for r in s.state_dict()["monitor"]["inserted"]] == ["sigmoid"]
    alerts = s.alerts
    alerts.clear()
    assert s.alerts, "the alerts view is a new list"


def test_raise_publishes_every_alert_then_releases_and_raises(tmp_path):
    adapter = FakeAdapter()
    s = session(tmp_path, adapter, bounds=(0, 1), on_violation="raise")
    s.count_steps()
    with pytest.raises(BoundGuardError) as info:
        s.check(*out_of_range_rows())
    assert info.value.alert.code == "output_out_of_range"
    assert adapter.released == 1
    assert set(file_actions(tmp_path / "alerts.jsonl")) == {"output_out_of_range", "missing_output_activation"}


def test_halt_sets_should_stop(tmp_path):
    s = session(tmp_path, FakeAdapter(), bounds=(0, 1), on_violation="halt")
    s.count_steps()
    assert not s.should_stop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.check(*out_of_range_rows())
    assert s.should_stop


def test_warning_points_at_the_users_code(tmp_path):
    s = session(tmp_path, FakeAdapter(), bounds=(0, 1), on_violation="warn")
    s.count_steps()
    with pytest.warns(BoundGuardWarning) as record:
        s.check(*out_of_range_rows())
    assert {w.filename for w in record} == {__file__}
    # ... so a user can silence boundguard for one module of theirs
    s2 = session(tmp_path / "b", FakeAdapter(), bounds=(0, 1), on_violation="warn")
    s2.count_steps()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=BoundGuardWarning, module=__name__)
        s2.check(*out_of_range_rows())
    assert [w for w in seen if issubclass(w.category, BoundGuardWarning)] == []


class Hooked:
    def __init__(self, s: Session) -> None:
        self._session, self.calls = s, 0

    @guarded
    def hook(self) -> str:
        self.calls += 1
        raise RuntimeError("synthetic internal error")


def test_guarded_switches_off_once_and_strict_reraises(tmp_path):
    adapter = FakeAdapter()
    h = Hooked(Session(Config(on_violation="log"), adapter, write=False))
    with pytest.warns(BoundGuardWarning, match="switched itself off") as record:
        assert h.hook() is None
        assert h.hook() is None  # disabled: not even called
    assert h.calls == 1 and len(record) == 1 and adapter.released == 1
    strict = Hooked(Session(Config(on_violation="log", strict=True), write=False))
    with pytest.raises(RuntimeError, match="synthetic"):
        strict.hook()


def test_summary_records_are_not_written_again_after_a_resume(tmp_path):
    s = session(tmp_path, FakeAdapter(), bounds=(0, 1), on_violation="log", check_every_n_steps=1)
    for _ in range(3):  # the same alert at three checks: one record, then one summary with count 3
        s.count_steps()
        s.check(*out_of_range_rows())
    s.finish()
    state = s.state_dict()  # e.g. guard.state_dict() after the run, saved with the model
    path = tmp_path / "alerts.jsonl"
    summaries = lambda: [json.loads(x) for x in path.read_text().splitlines() if '"summary"' in x]  # noqa: E731
    assert {r["count"] for r in summaries()} == {3}
    n = len(summaries())
    resumed = Session(Config(bounds=(0, 1), on_violation="log", check_every_n_steps=1, alerts_path=path), FakeAdapter())
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.open()
    resumed.finish()
    assert len(summaries()) == n, "the resumed run re-wrote summaries it had already written"
    resumed.count_steps()
    resumed.check(*out_of_range_rows())  # seen once more: one new summary each, with the new count
    resumed.finish()
    assert len(summaries()) == n + 2 and {r["count"] for r in summaries()[n:]} == {4}


def test_state_round_trip_restores_step_records_and_old_record_dicts(tmp_path):
    s = session(tmp_path, FakeAdapter(), bounds=(0, 1), on_violation="bound")
    s.count_steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.check(*out_of_range_rows())
    state = json.loads(json.dumps(s.state_dict()))
    r = Session(Config(bounds=(0, 1)), FakeAdapter(), write=False)
    assert r.load_state_dict(state) == s.records
    assert (r.step, r.interval_start, r.alerts) == (s.step, s.step + 1, s.alerts)
    # records written by the previous version (plain dicts, Keras with attr/output) still load
    old = {"module": "dense_1", "path": [], "kind": "scaled_sigmoid", "lo": 2.0, "hi": 5.0, "dim": -1, "step": 3,
           "attr": "head", "output": True}
    rec = BoundRecord.from_dict(old)
    assert rec.to_dict() == old and rec.activation() == ("scaled_sigmoid", {"lo": 2.0, "hi": 5.0})
    with pytest.raises(TypeError, match="load_state_dict"):
        r.load_state_dict(["not", "a", "state"])


def test_counting_plan_follows_bounds_and_activation():
    facts = ModelFacts(activation="clamp", activation_params={"lo": 0.0, "hi": 1.0}, loss=classify_loss("cross_entropy"))
    plan = CountingPlan.of(Bounds.distribution(), facts)
    assert (plan.lo, plan.hi, plan.distribution, plan.pin, plan.class_dim) == (0.0, 1.0, True, (0.0, 1.0), 1)
    assert CountingPlan.of(None, ModelFacts(activation="sigmoid")).tail == 6.0
    s = Session(Config(bounds="auto"), write=False)
    assert s.counting_plan().lo is None
    p = s.counting_plan(provisional_loss=classify_loss("binary_crossentropy"))
    assert (p.lo, p.hi) == (0.0, 1.0)


def test_merged_nan_loss_on_one_process_stays_nan():
    a, b = np.tile(neutral_row(), (2, 1)), np.tile(neutral_row(), (2, 1))
    loss = COLUMNS.index("loss.value")
    a[:, loss], b[:, loss] = [0.5, math.nan], [0.7, 0.3]
    merged = merge_rows(a, b)[:, loss]
    assert merged[0] == pytest.approx(0.6) and math.isnan(merged[1])
