"""BoundGuardCallback on real (tiny) transformers.Trainer runs: the seed bug, healthy twins, halt, raise,
gradient accumulation, logging through Trainer.log, options."""
from __future__ import annotations

import importlib
import json
import sys
import warnings

import pytest

from hf_tiny import Tokens, run_trainer, tiny_bert, tiny_gpt2  # (skips without transformers)
from helpers import assert_teaches_options, severe

from boundguard import BoundGuardError, BoundGuardWarning
from boundguard.config import OPTIONS
from boundguard.integrations.transformers import BoundGuardCallback
from transformers import default_data_collator

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here trains on one torch thread


def _logged(trainer, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def test_regression_head_without_sigmoid_is_caught_at_step_1(tmp_path):
    """The seed's bug in Trainer form: a regression head (num_labels=1, MSE) for targets in [0, 1], no sigmoid."""
    cb = BoundGuardCallback(bounds=(0, 1), check_every_n_steps=3, alerts_path=tmp_path / "alerts.jsonl")
    with pytest.warns(BoundGuardWarning) as warned:
        t = run_trainer(tiny_bert(1, "regression"), Tokens("regression"), cb, tmp_path)
    assert any("output_out_of_range at step 1" in str(w.message) for w in warned)
    at1 = {a.code: a for a in cb.alerts if a.step == 1}
    assert {"output_out_of_range", "missing_output_activation"} <= set(at1), cb.alerts
    assert at1["output_out_of_range"].severity == "error" and at1["output_out_of_range"].where == "classifier"
    assert at1["output_out_of_range"].epoch == 0  # the Trainer's epoch (one epoch holds 8 steps of 8 rows)
    assert cb._session.facts.loss.name == "mse_loss" and cb._session.facts.target_where == "batch['labels']"
    assert t.state.global_step == 6  # "warn" never stops the run
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert any(r.get("code") == "output_out_of_range" and r.get("step") == 1 for r in lines)


@pytest.mark.parametrize("make, labels, loss", [
    (lambda: tiny_bert(2), "class", "cross_entropy"),
    (tiny_gpt2, "lm", "cross_entropy"),
], ids=["bert-classifier", "gpt2-causal-lm"])
def test_healthy_models_are_silent_and_log_through_the_trainer(tmp_path, make, labels, loss):
    cb = BoundGuardCallback(check_every_n_steps=3, alerts_path=tmp_path / "alerts.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BoundGuardWarning)  # a healthy run warns about nothing
        t = run_trainer(make(), Tokens(labels), cb, tmp_path, max_steps=7)
    assert severe(cb.alerts) == set(), cb.alerts
    assert cb._session.facts.loss.name == loss and cb._session.step == t.state.global_step == 7
    # statistics reach trainer.state.log_history (and so every report_to integration) at check steps
    # only, and the Trainer's own per-step loss logging is untouched
    ours = _logged(t, "boundguard/loss_mean")
    assert sorted(ours) == [1, 3, 6]
    assert {"boundguard/preact_rms", "boundguard/alerts"} <= set(next(
        h for h in t.state.log_history if h.get("step") == 3 and "boundguard/loss_mean" in h))
    assert sorted(_logged(t, "loss")) == list(range(1, 8))
    assert ours[1] == pytest.approx(_logged(t, "loss")[1], rel=1e-5)


class NaNLabelsAt:
    """A collator that puts a NaN into the labels of its ``at``-th batch (the Trainer's step ``at``)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, features):
        self.calls += 1
        batch = default_data_collator(features)
        if self.calls == self.at:
            batch["labels"] = batch["labels"].clone()
            batch["labels"][0] = float("nan")
        return batch


def test_halt_stops_training_at_the_nan_step(tmp_path):
    cb = BoundGuardCallback(bounds=None, on_violation="halt", check_every_n_steps=3, alerts_path=tmp_path / "a.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        t = run_trainer(tiny_bert(1, "regression"), Tokens("regression"), cb, tmp_path, max_steps=10,
                        collator=NaNLabelsAt(2))
    # the NaN loss of step 2 trips a check there (checks are due at 1, 3, ...), where training stops cleanly
    assert t.state.global_step == 2
    assert {"nonfinite_input", "nonfinite_loss"} <= {a.code for a in cb.alerts if a.step == 2}, cb.alerts
    assert not any(a.step < 2 for a in cb.alerts if a.severity == "critical")


def test_raise_propagates_and_leaves_the_model_and_trainer_clean(tmp_path):
    cb = BoundGuardCallback(bounds=(0, 1), on_violation="raise", alerts_path=tmp_path / "a.jsonl")
    model = tiny_bert(1, "regression")
    with pytest.raises(BoundGuardError) as info:
        run_trainer(model, Tokens("regression"), cb, tmp_path)
    assert info.value.alert.code in ("output_out_of_range", "missing_output_activation")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert cb._wrapped is None


def test_gradient_accumulation_counts_steps_as_the_trainer_does(tmp_path):
    cb = BoundGuardCallback(bounds=None, check_every_n_steps=1, alerts_path=tmp_path / "alerts.jsonl")
    t = run_trainer(tiny_bert(2), Tokens("class"), cb, tmp_path, max_steps=4, gradient_accumulation_steps=2,
                    per_device_train_batch_size=4)
    assert cb._session.step == t.state.global_step == 4
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    checks = [r for r in stats if "target.n" in r]
    assert [r["step"] for r in checks] == [1, 2, 3, 4]
    # every check (one optimisation step) holds both micro-batches' targets and inputs
    assert all(r["target.n"] == 2 * 4 and r["input.n"] == 0 for r in checks)  # integer ids: no input stats
    # the step's loss is the Trainer's: the sum over the micro-batches that training_step returns
    ours, theirs = _logged(t, "boundguard/loss_mean"), _logged(t, "loss")
    assert sorted(ours) == [1, 2, 3, 4]
    for step, value in ours.items():
        assert value == pytest.approx(theirs[step], rel=1e-5)


def test_invalid_options_are_rejected_at_construction():
    assert_teaches_options(BoundGuardCallback, "BoundGuardCallback")
    with pytest.raises(ValueError, match="on_violation"):
        BoundGuardCallback(on_violation="stop")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        BoundGuardCallback(check_every_n_steps=0)
    with pytest.raises(TypeError, match="log_stats"):
        BoundGuardCallback(log_stats="yes")
    with pytest.raises(TypeError, match="bounds"):
        BoundGuardCallback(bounds=(0, "1"))


def test_state_is_json_and_rebuilds_the_callback():
    cb = BoundGuardCallback(bounds=(0, 1), on_violation="halt", actions={"nonfinite_loss": "raise"},
                            check_every_n_steps=7, thresholds={"loss_spike": {"factor": 6}}, log_stats=False)
    state = json.loads(json.dumps(cb.state()))
    copy = BoundGuardCallback(**state["args"])
    copy.session_state = state["attributes"]["session_state"]
    assert copy.state() == cb.state()
    assert list(state["args"]) == [*OPTIONS, "log_stats"]  # one option list: Config's, plus the callback's own
    assert BoundGuardCallback(bounds="distribution").state()["args"]["bounds"] == "distribution"


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "boundguard.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r"boundguard\[transformers\]"):
        importlib.import_module("boundguard.integrations.transformers")


def test_evaluation_during_training_is_not_counted(tmp_path):
    cb = BoundGuardCallback(bounds=None, check_every_n_steps=1, alerts_path=tmp_path / "alerts.jsonl")
    t = run_trainer(tiny_bert(2), Tokens("class"), cb, tmp_path, max_steps=3, eval_data=Tokens("class", n=16),
                    eval_strategy="steps", eval_steps=1)
    assert len(_logged(t, "eval_loss")) == 3  # the Trainer evaluated after every step...
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    # ...but the eval-mode forwards are neither steps nor statistics
    assert cb._session.step == 3 and all(r["target.n"] == 8 for r in stats if "target.n" in r)


def test_fp16_scaling_is_read_from_the_optimizer_the_trainer_hands(tmp_path):
    """The callback learns that gradients are fp16-scaled from the ``optimizer`` keyword of ``on_train_begin``
    (accelerate's AcceleratedOptimizer holds the GradScaler), not from the Trainer object."""
    from types import SimpleNamespace

    cb = BoundGuardCallback(alerts_path=tmp_path / "a.jsonl", strict=True)
    args = SimpleNamespace(world_size=1, process_index=0)
    state = SimpleNamespace(epoch=0, global_step=0, stateful_callbacks={})
    for scaler, scaled in ((object(), True), (None, False)):
        cb.on_train_begin(args, state, SimpleNamespace(), model=tiny_bert(2), optimizer=SimpleNamespace(scaler=scaler))
        assert cb._trainer is None and cb._engine.grad_scaled is scaled
        cb._stop()
