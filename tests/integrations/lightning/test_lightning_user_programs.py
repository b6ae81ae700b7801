"""Real (tiny) Lightning programs that copy the model, average it, or carry two monitors (issue 21, "never
break the user's program").

Each program runs to the end with the ``BoundGuard`` callback; a healthy one raises nothing of severity
warning or above and the monitor stays on; its final weights equal those of the same seeded run without
boundguard; and after the copy the model is still watched (a fault injected afterwards is reported).
"""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from boundguard.integrations.lightning import BoundGuard
from boundguard.integrations.torch.bounding import BoundHook
from boundguard.integrations.torch.hooks import INERT

from conftest import L, trainer
from helpers import codes_at, hooks_of, live_hooks, same_weights, severe

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.usefixtures("one_thread")]  # every test here trains on one torch thread

NAN = float("nan")


# ============================================================================================ helpers
def guard(tmp_path, **kw) -> BoundGuard:
    kw.setdefault("on_violation", "log")
    kw.setdefault("check_every_n_steps", 4)
    kw.setdefault("strict", True)  # an internal error of the monitor must fail the test, not go quiet
    kw.setdefault("alerts_path", tmp_path / "alerts.jsonl")
    return BoundGuard(**kw)


def run(model, dl, callbacks, **kw):
    t = trainer(callbacks, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, dl)
    return t


def binary_data(n=256, din=8, seed=0, nan_batch=None, batch=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g)
    y = (x[:, :2].sum(1, keepdim=True) > 0).float()
    if nan_batch is not None:
        x[nan_batch * batch + 3, 1] = NAN
    return x, y


def dl(x, *ys, batch=32):
    return DataLoader(TensorDataset(x, *ys), batch_size=batch, shuffle=False)


class Net(nn.Module):
    """Linear(8→16)→Tanh→Linear(16→1): logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc(self.body(x))


# ============================================================================================ 1. EMA teacher
class MeanTeacher(L.LightningModule):
    """``self.ema = copy.deepcopy(self.net)`` inside ``training_step`` at the first step (the probe is
    recording), a teacher forward under ``no_grad`` every step, an EMA update after every step."""

    def __init__(self):
        super().__init__()
        self.net = Net()
        self.ema = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.ema is None:
            self.ema = copy.deepcopy(self.net)
            self.ema.requires_grad_(False)
        logits = self(x)
        with torch.no_grad():
            teacher = self.ema(x + 0.05)
        return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * F.mse_loss(torch.sigmoid(logits),
                                                                                 torch.sigmoid(teacher))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.net.parameters()):
                pe.mul_(0.9).add_(pm, alpha=0.1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_ema_teacher_deepcopy_in_training_step(tmp_path):
    """Pattern 1 (Lightning): the EMA teacher deep-copied inside ``training_step`` at step 1 trains exactly
    as without boundguard, silently, with an inert copy; a NaN batch after the copy is reported."""
    x, y = binary_data()
    torch.manual_seed(0)
    base = MeanTeacher()
    run(base, dl(x, y), [], max_steps=8)
    torch.manual_seed(0)
    model = MeanTeacher()
    g = guard(tmp_path / "ok", bounds=(0, 1))
    t = run(model, dl(x, y), [g], max_steps=8)
    assert t.global_step == g._session.step == 8 and not g._session.disabled
    assert severe(g.alerts) == set(), g.alerts
    assert same_weights(model, base)  # the student and the teacher (a submodule now)
    assert INERT in hooks_of(model.ema) and live_hooks(model.ema) == []  # copied mid-probe: inert
    assert g._session.facts.pre_where == "net.fc"

    xn, yn = binary_data(nan_batch=5)
    torch.manual_seed(0)
    faulty = guard(tmp_path / "nan", bounds=(0, 1))
    run(MeanTeacher(), dl(xn, yn), [faulty], max_steps=8)
    assert not faulty._session.disabled
    assert "nonfinite_input" in codes_at(faulty.alerts, 6), faulty.alerts


# ============================================================================================ 2. SWA
class Lit(L.LightningModule):
    """``net`` + BCE-with-logits + SGD; ``train_dataloader`` gives ``nan_epoch`` a corrupted batch (used with
    ``reload_dataloaders_every_n_epochs=1``)."""

    def __init__(self, bn: bool = False, nan_epoch=None):
        super().__init__()
        self.net = Net()
        if bn:
            self.net.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.nan_epoch = nan_epoch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def train_dataloader(self):
        x, y = binary_data(n=128)
        if self.current_epoch == self.nan_epoch:
            x = x.clone()
            x[40, 2] = NAN  # batch 2 of this epoch
        return dl(x, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _swa_fit(model, callbacks, warm_up: bool = False):
    """``warm_up``: a first short fit with the same callbacks and no SWA (fine-tuning comes next), so
    that the monitor's hooks are on the model when SWA deep-copies it at ``setup``."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if warm_up:
            trainer(callbacks, max_steps=-1, max_epochs=1).fit(model)
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
        t = trainer(callbacks + [swa], max_steps=-1, max_epochs=4, reload_dataloaders_every_n_epochs=1)
        t.fit(model)
    return t, swa


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
def test_stochastic_weight_averaging_callback(tmp_path, bn):
    """Pattern 2 (Lightning): a warm-up fit, then ``StochasticWeightAveraging`` beside the same ``BoundGuard``
    (with BatchNorm, SWA adds an epoch of forwards without optimiser steps): same final (averaged) weights
    as without boundguard, silent; SWA's deep copy of the watched model has inert hooks only."""
    torch.manual_seed(0)
    base = Lit(bn)
    _swa_fit(base, [], warm_up=True)
    torch.manual_seed(0)
    model = Lit(bn)
    g = guard(tmp_path, bounds=(0, 1))
    t, swa = _swa_fit(model, [g], warm_up=True)
    assert t.current_epoch >= 4 and not g._session.disabled
    assert severe(g.alerts) == set(), g.alerts
    assert same_weights(model, base)
    assert INERT in hooks_of(swa._average_model) and live_hooks(swa._average_model) == []
    # 4 warm-up batches + 16 batches; with BatchNorm SWA's extra epoch feeds 4 more training batches
    assert g._session.step == 4 + 16 + (4 if bn else 0)


def test_stochastic_weight_averaging_keeps_the_model_watched(tmp_path):
    """Pattern 2 (fault after the copy): with SWA averaging from epoch 2, a corrupted batch in epoch 3
    (step 4 * 3 + 2 = 14) is reported at its step."""
    torch.manual_seed(0)
    g = guard(tmp_path, bounds=(0, 1))
    _swa_fit(Lit(nan_epoch=3), [g])
    assert not g._session.disabled
    assert "nonfinite_input" in codes_at(g.alerts, 14), g.alerts
    assert not [a for a in g.alerts if a.step < 14 and a.severity != "info"], g.alerts


# ============================================================================================ 7. sequence model
class Forecaster(L.LightningModule):
    """An LSTMCell unrolled by hand, its output Linear once per time step; a 20-step forecast under
    ``no_grad`` after every training step."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(1, 16)
        self.out = nn.Linear(16, 1)
        self.forecasts = []

    def forward(self, seq, future: int = 0):
        h = c = seq.new_zeros(seq.shape[0], 16)
        outs = []
        for t in range(seq.shape[1]):
            h, c = self.cell(seq[:, t], (h, c))
            outs.append(self.out(h))
        for _ in range(future):
            h, c = self.cell(outs[-1], (h, c))
            outs.append(self.out(h))
        return torch.stack(outs, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.forecasts.append(self(batch[0][:4], future=20))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _series(n=256, steps=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    phase = 6.28 * torch.rand(n, 1, generator=g)
    return list(torch.sin(phase + 0.3 * torch.arange(steps + 1)).unsqueeze(-1))  # n windows of (steps + 1, 1)


def _next_step(windows):
    """Collate: stack the windows once, then slice inputs and next-step targets (two views of one tensor)."""
    s = torch.stack(windows)
    return s[:, :-1], s[:, 1:]


def test_sequence_forecaster_with_next_step_collate(tmp_path):
    """Pattern 7 (Lightning): an LSTMCell forecaster whose batches are sliced by the collate function into
    inputs and next-step targets, forecasting under ``no_grad`` after every step: silent, no
    ``nonfinite_output``, same weights as without boundguard, and the targets are located as ``batch[1]``
    and the inputs as ``batch[0]``."""
    data = _series()
    torch.manual_seed(0)
    base = Forecaster()
    run(base, DataLoader(data, batch_size=16, collate_fn=_next_step), [], max_steps=8)
    torch.manual_seed(0)
    model = Forecaster()
    g = guard(tmp_path, bounds=(-1, 1))
    run(model, DataLoader(data, batch_size=16, collate_fn=_next_step), [g], max_steps=8)
    assert g._session.step == 8 and not g._session.disabled
    assert "nonfinite_output" not in {a.code for a in g.alerts}
    assert severe(g.alerts) == set(), g.alerts
    assert same_weights(model, base)
    assert len(model.forecasts) == 8 and model.forecasts[-1].shape == (4, 32, 1)
    facts = g._session.facts
    assert (facts.target_where, facts.input_where) == ("batch[1]", "batch[0]"), facts
    assert not [a for a in g.alerts if a.code == "probe_incomplete" and a.where in ("inputs", "targets")], g.alerts


# ============================================================================================ 9. two callbacks
class TwoHeads(L.LightningModule):
    """One body, two heads: ``a`` a probability (sigmoid), ``b`` a raw linear head for a target in (-1, 1);
    the loss is the sum of the two."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.fc_a = nn.Linear(16, 1)
        self.fc_b = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return {"a": torch.sigmoid(self.fc_a(h)), "b": self.fc_b(h)}

    def training_step(self, batch, batch_idx):
        x, ya, yb = batch
        out = self(x)
        return F.binary_cross_entropy(out["a"], ya) + F.mse_loss(out["b"], yb)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _two_head_data():
    x, ya = binary_data()
    yb = 0.8 * torch.tanh(x[:, 2:3] - x[:, 3:4])
    return dl(x, ya, yb)


def test_two_callbacks_one_per_head_save_and_resume(tmp_path):
    """Pattern 9: two ``BoundGuard`` callbacks in one Trainer, each with its own ``output_key``: each watches
    its own head (the raw head ``b`` gets its tanh inserted, ``a`` stays silent); a checkpoint holds each
    state under its own key and ``fit(ckpt_path=...)`` restores each into its own callback."""
    torch.manual_seed(0)
    model = TwoHeads()
    ga = guard(tmp_path / "a", output_key="a", bounds=(0, 1))
    gb = guard(tmp_path / "b", output_key="b", bounds=(-1, 1), on_violation="bound")
    assert ga.state_key != gb.state_key
    t = run(model, _two_head_data(), [ga, gb], max_steps=6)
    assert t.global_step == 6 and ga._session.step == gb._session.step == 6
    assert not ga._session.disabled and not gb._session.disabled
    assert (ga._session.facts.pre_where, gb._session.facts.pre_where) == ("fc_a", "fc_b")
    assert severe(ga.alerts) == set(), ga.alerts
    assert "missing_output_activation" in codes_at(gb.alerts, 1), gb.alerts
    assert [r["module"] for r in gb.bounds_inserted] == ["fc_b"] and ga.bounds_inserted == []
    ckpt_path = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt_path)
    states = torch.load(ckpt_path, weights_only=False)["callbacks"]
    assert {ga.state_key, gb.state_key} <= set(states)
    assert states[gb.state_key]["monitor"]["inserted"] and not states[ga.state_key]["monitor"]["inserted"]

    torch.manual_seed(1)
    fresh = TwoHeads()
    ga2 = guard(tmp_path / "a2", output_key="a", bounds=(0, 1))
    gb2 = guard(tmp_path / "b2", output_key="b", bounds=(-1, 1), on_violation="bound")
    t2 = trainer([ga2, gb2], max_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.fit(fresh, _two_head_data(), ckpt_path=str(ckpt_path))
    assert t2.global_step == 10 and ga2._session.step == gb2._session.step == 10
    assert not ga2._session.disabled and not gb2._session.disabled
    assert severe(ga2.alerts) == set() and ga2.bounds_inserted == []
    assert [r["module"] for r in gb2.bounds_inserted] == ["fc_b"]
    assert "missing_output_activation" in codes_at(gb2.alerts, 1)  # restored, not re-found
    assert [type(h) for h in fresh.fc_b._forward_hooks.values()].count(BoundHook) == 1
    assert not any(isinstance(h, BoundHook) for h in fresh.fc_a._forward_hooks.values())
    with torch.no_grad():
        out = fresh(10 * torch.randn(64, 8))
    assert float(out["b"].abs().max()) <= 1.0


def test_two_unnamed_callbacks_are_refused_by_lightning(tmp_path):
    """Pattern 9: two callbacks without ``name`` or ``output_key`` share one state key: Lightning refuses them
    with its error about ``state_key``; two named ones are accepted."""
    with pytest.raises(RuntimeError, match="state_key"):
        trainer([guard(tmp_path), guard(tmp_path)])
    a, b = guard(tmp_path, name="main"), guard(tmp_path, name="aux")
    assert (a.state_key, b.state_key) == ("BoundGuard[main]", "BoundGuard[aux]")
    trainer([a, b])


# ============================================================================================ 10. numpy options
def test_numpy_scalars_as_callback_options(tmp_path):
    """Pattern 10 (Lightning): ``BoundGuard(bounds=(np.float32(0), np.float32(1)),
    check_every_n_steps=np.int64(5))`` with a logger and checkpoints: checks at steps 1, 5, 10, strict
    JSON files, and a resume from the saved checkpoint works."""
    from lightning.pytorch.loggers import CSVLogger

    x, y = binary_data()

    def make():
        return BoundGuard(bounds=(np.float32(0), np.float32(1)), check_every_n_steps=np.int64(5),
                          on_violation="log", strict=True)

    class Raw(Lit):
        def forward(self, x):
            return 4 * torch.tanh(self.net(x))  # a head that leaves (0, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

    torch.manual_seed(0)
    g = make()
    t = trainer([g], max_steps=10, logger=CSVLogger(tmp_path, name="run"), enable_checkpointing=True,
                default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Raw(), dl(x, y))
    assert not g._session.disabled and g._session.step == 10
    assert "output_out_of_range" in codes_at(g.alerts, 1), g.alerts
    run_dir = tmp_path / "run" / "version_0"
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "stats"] == [1, 5, 10]
    for line in (run_dir / "alerts.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))

    g2 = make()
    t2 = trainer([g2], max_steps=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.fit(Raw(), dl(x, y), ckpt_path=str(ckpt))
    assert t2.global_step == 15 and g2._session.step == 15 and not g2._session.disabled
    assert "output_out_of_range" in codes_at(g2.alerts, 1)  # restored from the checkpoint
