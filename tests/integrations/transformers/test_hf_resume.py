"""BoundGuardCallback state in Trainer checkpoints (trainer_state.json), restored on resume_from_checkpoint."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_tiny import SEQ, Tokens, run_trainer, tiny_bert  # (skips without transformers)

from boundguard import BoundGuardWarning
from boundguard.integrations.transformers import BoundGuardCallback

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here trains on one torch thread


def _guard(tmp_path) -> BoundGuardCallback:
    return BoundGuardCallback(bounds=(0, 1), on_violation="bound", check_every_n_steps=2,
                              alerts_path=tmp_path / "alerts.jsonl")


@pytest.mark.parametrize("trainer_restores", [False, True], ids=["callback-restores", "trainer-restores"])
def test_state_and_inserted_bound_survive_resume_from_checkpoint(tmp_path, trainer_restores):
    first = _guard(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        run_trainer(tiny_bert(1, "regression"), Tokens("regression"), first, tmp_path / "run", max_steps=4,
                    save_strategy="steps", save_steps=4)
    assert [r["step"] for r in first.bounds_inserted] == [1]
    ckpt = tmp_path / "run" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["BoundGuardCallback"]
    assert saved["attributes"]["session_state"]["step"] == 4 and saved["args"]["bounds"] == [0.0, 1.0]

    second = _guard(tmp_path)  # a fresh process would build a fresh callback and model the same way
    model = tiny_bert(1, "regression", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        t = run_trainer(model, Tokens("regression"), second, tmp_path / "run", max_steps=8, resume=str(ckpt),
                        restore_callback_states_from_checkpoint=trainer_restores)
    live = [cb for cb in t.callback_handler.callbacks if isinstance(cb, BoundGuardCallback)]
    assert len(live) == 1 and (live[0] is second) != trainer_restores  # the Trainer replaces it with a copy
    guard = live[0]
    assert guard._session.step == t.state.global_step == 8
    assert {"output_out_of_range", "missing_output_activation"} <= {a.code for a in guard.alerts if a.step == 1}
    assert guard.bounds_inserted == first.bounds_inserted  # replayed, not inserted a second time
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=torch.randint(0, 100, (32, SEQ))).logits
    assert float(pred.min()) >= 0.0 and float(pred.max()) <= 1.0  # the bound is on the resumed model
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    new = [r for r in lines if r.get("code") == "output_out_of_range" and r.get("event") == "new"]
    assert len(new) == 1 and new[0]["step"] == 1  # resuming does not report the restored alert again
