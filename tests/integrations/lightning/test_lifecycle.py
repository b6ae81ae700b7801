"""The Lightning callback on the shared session: the end of a run is judged, options are passed by
name, and the metrics logged at a check are that check's."""
from __future__ import annotations

import numpy as np
from boundguard.integrations.lightning import BoundGuard

import torch
from conftest import Tiny, data, fit


def test_the_last_batches_are_judged_at_the_end_of_training(tmp_path):
    """Batches 61-64 of 64 hold targets outside the bounds; checks are at steps 1 and 50: the final check
    sees them. (NaN inputs there trip a check at step 61 itself: the NaN tripwire.)"""
    for fault, code, step in (("targets", "target_out_of_range", 64), ("nan", "nonfinite_input", 61)):
        x, y = data(n=64 * 32, kind="binary")
        if fault == "nan":
            x[60 * 32:, 0] = np.nan
        else:
            y[60 * 32:] = 3.0
        g = BoundGuard(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / fault / "alerts.jsonl")
        fit(Tiny(head=torch.nn.Sigmoid()), x, y, g, max_steps=64)
        (alert,) = [a for a in g.alerts if a.code == code]
        assert alert.step == step, fault


def test_options_reach_the_config_by_name(tmp_path):
    g = BoundGuard(bounds="probability", on_violation="halt", actions={"nonfinite_loss": "raise"},
                   check_every_n_steps=7, alerts_path=tmp_path / "a.jsonl", input_key=0, target_key=1)
    c = g._config
    assert (c.on_violation, c.actions, c.check_every_n_steps, c.input_key, c.target_key) == (
        "halt", {"nonfinite_loss": "raise"}, 7, 0, 1)
    assert (c.bounds.lo, c.bounds.hi) == (0.0, 1.0)


def test_a_second_fit_with_the_same_callback_is_watched(tmp_path):
    x, y = data(n=320, kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl")
    model = Tiny(head=torch.nn.Sigmoid())
    fit(model, x, y, g, max_steps=5)
    assert not [a for a in g.alerts if a.severity != "info"]
    bad = x.copy()
    bad[:, 0] = np.nan
    fit(model, bad, y, g, max_steps=5)  # a new Trainer, the same callback instance
    assert [a.code for a in g.alerts if a.code == "nonfinite_input"] == ["nonfinite_input"]
    assert not g._session.disabled


def test_resume_with_changed_options_keeps_the_bound_and_the_alerts(tmp_path):
    from conftest import loader, trainer

    x, y = data(n=640, kind="unit")
    model = Tiny(scale=8.0)
    g = BoundGuard(bounds=(0, 1), on_violation="bound", check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl")
    t = trainer([g], max_steps=10, enable_checkpointing=True, default_root_dir=tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(x, y))
        ckpt = tmp_path / "resume.ckpt"
        t.save_checkpoint(ckpt)
        assert g.bounds_inserted
        fresh = Tiny(scale=8.0)
        g2 = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=10, alerts_path=tmp_path / "b.jsonl")
        t2 = trainer([g2], max_steps=20)
        t2.fit(fresh, loader(x, y), ckpt_path=str(ckpt))
    assert g2.bounds_inserted == g.bounds_inserted
    assert [a.code for a in g2.alerts][: len(g.alerts)] == [a.code for a in g.alerts]
    assert g2._session.step == 20 and not g2._session.disabled
    with torch.no_grad():
        out = fresh(torch.from_numpy(x[:256]) * 5)
    assert out.min() >= 0 and out.max() <= 1


def test_old_checkpoints_keyed_by_options_still_restore():
    g = BoundGuard(bounds=(0, 1))
    state = {"monitor": {"inserted": [], "alerts": []}, "step": 7}
    ckpt = {"callbacks": {"BoundGuard{'bounds': {'lo': 0.0}, 'on_violation': 'warn'}": state}}
    g.on_load_checkpoint(None, None, ckpt)
    assert ckpt["callbacks"][g.state_key] is state


def test_apply_bounds_reads_a_checkpoint_written_by_the_default_model_checkpoint(tmp_path):
    """ModelCheckpoint's own state also has a "monitor" key (None): apply_bounds finds boundguard's state."""
    import glob
    import warnings

    from boundguard.integrations.lightning import apply_bounds
    from conftest import loader, trainer

    x, y = data(n=320, kind="unit")
    g = BoundGuard(bounds=(0, 1), on_violation="bound", alerts_path=tmp_path / "a.jsonl")
    t = trainer([g], max_steps=10, enable_checkpointing=True, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Tiny(scale=8.0), loader(x, y))
    (ckpt,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    fresh = Tiny(scale=8.0)
    assert apply_bounds(fresh, ckpt) == g.bounds_inserted and g.bounds_inserted
    with torch.no_grad():
        out = fresh(torch.from_numpy(x) * 5)
    assert out.min() >= 0 and out.max() <= 1


def test_metrics_reach_callback_metrics_and_the_logger_on_lightnings_step_numbering(tmp_path):
    """EarlyStopping can monitor a boundguard metric; the CSV rows sit on the steps self.log uses."""
    import csv
    import glob
    import warnings

    import lightning.pytorch as L
    from conftest import loader

    x, y = data(n=256, kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=2, alerts_path=tmp_path / "a.jsonl")
    stop = L.callbacks.EarlyStopping(monitor="boundguard/out_of_bounds_share", mode="min", patience=100,
                                     check_on_train_epoch_end=True)
    t = L.Trainer(max_steps=6, callbacks=[g, stop], logger=L.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
                  enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                  accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Tiny(head=torch.nn.Sigmoid()), loader(x, y))
    assert float(t.callback_metrics["boundguard/out_of_bounds_share"]) == 0.0
    (path,) = glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)
    steps = [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("boundguard/loss_mean")]
    assert steps == [0, 1, 3, 5], "checks after batches 1, 2, 4, 6 are logged at global_step 0, 1, 3, 5"
