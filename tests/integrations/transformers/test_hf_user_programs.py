"""Real (tiny) Hugging Face Trainer programs that copy the model mid-training or pass numpy scalars as
options (issue 21, "never break the user's program")."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_tiny import Tokens, run_trainer, tiny_bert  # (skips without transformers)
from helpers import hooks_of, severe

from boundguard import BoundGuardWarning
from boundguard.integrations.torch.bounding import BoundHook
from boundguard.integrations.torch.hooks import INERT
from boundguard.integrations.transformers import BoundGuardCallback
from transformers import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here trains on one torch thread


class MeanTeacherTrainer(Trainer):
    """``compute_loss`` deep-copies the model at its first call (the first step, while the probe records),
    runs the EMA teacher under ``no_grad`` and adds a consistency loss; the EMA is updated every step."""

    ema = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.ema is None:
            self.ema = copy.deepcopy(model)
            self.ema.requires_grad_(False)
        else:
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), model.parameters()):
                    pe.mul_(0.9).add_(pm, alpha=0.1)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher = self.ema(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        consistency = F.mse_loss(outputs.logits.softmax(-1), teacher.softmax(-1))
        loss = outputs.loss + 0.5 * consistency
        return (loss, outputs) if return_outputs else loss


def _mean_teacher(model, callback, out, **args):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, report_to=[], use_cpu=True,
              save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0)
    kw.update(args)
    trainer = MeanTeacherTrainer(model=model, args=TrainingArguments(**kw), train_dataset=Tokens("class"),
                                 callbacks=[callback] if callback is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        trainer.train()
    return trainer


def test_mean_teacher_deepcopy_in_compute_loss(tmp_path):
    """Pattern 1 (Trainer): the EMA teacher deep-copied in ``compute_loss`` at the first step trains exactly as
    without boundguard, silently; the copy carries inert hooks only; the student stays watched."""
    base = _mean_teacher(tiny_bert(2), None, tmp_path / "base")
    cb = BoundGuardCallback(check_every_n_steps=3, alerts_path=tmp_path / "alerts.jsonl", strict=True)
    t = _mean_teacher(tiny_bert(2), cb, tmp_path / "run")
    assert t.state.global_step == cb._session.step == 6 and not cb._session.disabled
    assert severe(cb.alerts) == set(), cb.alerts
    sb, sw = base.model.state_dict(), t.model.state_dict()
    assert sb.keys() == sw.keys() and all(torch.equal(sb[k], sw[k]) for k in sb)
    teacher_hooks = hooks_of(t.ema)
    assert INERT in teacher_hooks and all(h is INERT or isinstance(h, BoundHook) for h in teacher_hooks)
    assert cb._session.facts.pre_where == "classifier"
    snap = cb._session.last_snapshot  # steps 4..6: 3 batches of 8 rows x 2 logits (the teacher's are not)
    assert (snap.first_step, snap.step, snap.counts["pre"]) == (4, 6, 3 * 8 * 2), snap


def test_mean_teacher_with_a_raw_regression_head_is_still_reported(tmp_path):
    """Pattern 1 (fault): the same program on a regression head without sigmoid, bounds=(0, 1): the copy made
    mid-probe does not stop the head from being judged."""

    class RegressionTeacher(MeanTeacherTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.ema is None:
                self.ema = copy.deepcopy(model)
            outputs = model(**inputs)
            with torch.no_grad():
                self.ema(input_ids=inputs["input_ids"])
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    from transformers import TrainingArguments

    cb = BoundGuardCallback(bounds=(0, 1), check_every_n_steps=2, alerts_path=tmp_path / "alerts.jsonl", strict=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    model = tiny_bert(1, "regression")
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # the raw head's outputs leave (0, 1) from the first step
    t = RegressionTeacher(model=model, args=args, train_dataset=Tokens("regression"), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        t.train()
    assert not cb._session.disabled and cb._session.step == 4
    assert {"output_out_of_range", "missing_output_activation"} <= {a.code for a in cb.alerts if a.step == 1}, cb.alerts


def test_numpy_scalars_as_callback_options_survive_checkpoint_and_resume(tmp_path):
    """Pattern 10 (Trainer): ``BoundGuardCallback(bounds=(np.float32(0), np.float32(1)),
    check_every_n_steps=np.int64(2))``: the Trainer writes its checkpoints (``trainer_state.json`` is JSON),
    checks happen at steps 1, 2, 4, and resuming (with the Trainer rebuilding the callback from its saved
    arguments) works."""

    def make():
        return BoundGuardCallback(bounds=(np.float32(0), np.float32(1)), check_every_n_steps=np.int64(2),
                                  alerts_path=tmp_path / "alerts.jsonl", strict=True)

    first = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        run_trainer(tiny_bert(1, "regression"), Tokens("regression"), first, tmp_path / "run", max_steps=4,
                    save_strategy="steps", save_steps=4)
    assert not first._session.disabled and first._session.step == 4
    ckpt = tmp_path / "run" / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["BoundGuardCallback"]
    assert saved["args"]["bounds"] == [0.0, 1.0] and saved["args"]["check_every_n_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "stats"] == [1, 2, 4]
    assert "output_out_of_range" in {a.code for a in first.alerts if a.step == 1}

    second = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        t = run_trainer(tiny_bert(1, "regression", seed=1), Tokens("regression"), second, tmp_path / "run",
                        max_steps=6, resume=str(ckpt), restore_callback_states_from_checkpoint=True)
    (live,) = [cb for cb in t.callback_handler.callbacks if isinstance(cb, BoundGuardCallback)]
    assert live._session.step == t.state.global_step == 6 and not live._session.disabled
    assert "output_out_of_range" in {a.code for a in live.alerts if a.step == 1}  # restored
