"""Real (tiny) plain-PyTorch programs that copy, save, compile, sample from or validate a watched model
(issue 21, "never break the user's program").

Each program runs to the end under ``watch()``; a healthy one raises nothing of severity warning or above
and the monitor stays on; where the program trains, its final weights equal those of the same seeded run
without boundguard; and after the copy / save / sample the watched model is still watched (a fault
injected afterwards is reported).
"""
from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from boundguard.integrations.torch import watch
from boundguard.integrations.torch.bounding import BoundHook
from boundguard.integrations.torch.hooks import MonitorHook
from helpers import codes_at, hooks_of, live_hooks, loud, same_weights

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.usefixtures("one_thread_seeded")]  # one torch thread, every program from one seed

NAN = float("nan")


# ============================================================================================ helpers
def opts(tmp_path, **kw) -> dict:
    kw.setdefault("on_violation", "log")
    kw.setdefault("check_every_n_steps", 4)
    kw.setdefault("strict", True)  # an internal error of the monitor must fail the test, not go quiet
    kw.setdefault("alerts_path", tmp_path / "alerts.jsonl")
    return kw


def binary_batches(n: int, batch: int = 32, din: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed batches (their own generator): a linearly separable binary target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, din, generator=g)
        out.append((x, (x[:, :2].sum(1, keepdim=True) > 0).float()))
    return out


class SigmoidMLP(nn.Module):
    """Linear(4→16)→Tanh→Linear(16→1)→sigmoid: a healthy probability head."""

    def __init__(self, din: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(din, 16), nn.Tanh())
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(self.body(x)))


class LogitMLP(SigmoidMLP):
    """The same network returning logits, for ``binary_cross_entropy_with_logits`` (a NaN batch reaches
    the loss instead of crashing ``binary_cross_entropy``'s range check)."""

    def forward(self, x):
        return self.fc(self.body(x))


class RawMLP(SigmoidMLP):
    """The same network with no output activation (and a large initial head): a raw head, out of (0, 1)."""

    def __init__(self, din: int = 4):
        super().__init__(din)
        with torch.no_grad():
            self.fc.weight.mul_(4.0)

    def forward(self, x):
        return self.fc(self.body(x))


# ============================================================================================ 1. EMA teacher
def _ema_program(batches, guard_opts=None, nan_at=None):
    """Mean teacher: ``ema = copy.deepcopy(model)`` in the middle of step 1 (after the student's forward,
    while the first-step probe records), an EMA update after every step, and a teacher forward under
    ``no_grad`` every step whose output enters a consistency loss. Returns (model, ema, guard)."""
    torch.manual_seed(0)
    model = LogitMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, **guard_opts) if guard_opts is not None else None
    ema = None
    g = torch.Generator().manual_seed(7)
    for step, (x, y) in enumerate(batches, start=1):
        if step == nan_at:
            x = x.clone()
            x[3, 1] = NAN  # a corrupted batch after the copy
        pred = model(x)
        if ema is None:
            ema = copy.deepcopy(model)  # step 1, mid-step
            ema.requires_grad_(False)
        x_aug = x + 0.05 * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            teacher = ema(x_aug[:24])  # another batch size
        consistency = F.mse_loss(torch.sigmoid(model(x_aug[:24])), torch.sigmoid(teacher))
        loss = F.binary_cross_entropy_with_logits(pred, y) + 0.5 * consistency
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss, inputs=x, targets=y)
        opt.zero_grad()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(0.9).add_(pm, alpha=0.1)
    if guard is not None:
        guard.close()
    return model, ema, guard


def test_ema_teacher_deepcopy_at_step_1(tmp_path):
    """Pattern 1 (plain loop): an EMA teacher deep-copied at step 1 trains exactly as without boundguard,
    silently; the copy has no live hooks; the student is still watched (a later NaN input is reported)."""
    batches = binary_batches(9)
    base_model, base_ema, _ = _ema_program(batches)
    model, ema, guard = _ema_program(batches, opts(tmp_path / "ok", bounds=(0, 1)))
    assert guard.engine.step == 9 and not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    assert same_weights(model, base_model) and same_weights(ema, base_ema)
    assert hooks_of(ema) and live_hooks(ema) == []  # the copied hooks are there, and inert
    # the last check (at close: step 9) counts the student's forwards, 32 + 24 rows (grad on); the
    # teacher's 24 rows under no_grad are not statistics
    assert guard.engine.monitor.facts.pre_where == "fc"
    snap = guard.engine.last_snapshot
    assert (snap.first_step, snap.step, snap.counts["pre"]) == (9, 9, 32 + 24), snap

    _, _, faulty = _ema_program(batches, opts(tmp_path / "nan", bounds=(0, 1)), nan_at=6)
    assert not faulty.engine.disabled
    assert "nonfinite_input" in codes_at(faulty.alerts, 6), faulty.alerts


def test_copy_forward_with_gradients_feeds_nothing(tmp_path):
    """Pattern 1 (a copy in training mode, gradients on): a deep copy made after the probe, run with
    gradients on inside every step on huge inputs, feeds nothing into the original's statistics."""
    torch.manual_seed(0)
    model = SigmoidMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = binary_batches(8)
    with watch(model, **opts(tmp_path, bounds=(0, 1))) as guard:
        twin = None
        for step, (x, y) in enumerate(batches, start=1):
            loss = F.binary_cross_entropy(model(x), y)
            if twin is None and step == 2:
                twin = copy.deepcopy(model)  # after the probe: the statistics hooks are in place
            if twin is not None:
                twin(torch.full((50, 4), 1e6)).sum().backward()  # grad on, train mode, 50 rows
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    assert guard.engine.step == 8 and not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    assert live_hooks(twin) == [] and not any(isinstance(h, MonitorHook) for h in hooks_of(twin))
    snap = guard.engine.last_snapshot  # the check at step 8 covers steps 5..8: 4 batches of 32 rows
    assert (snap.first_step, snap.step) == (5, 8)
    assert snap.counts["pre"] == 4 * 32, snap.counts
    assert snap.values["pre.max"] < 100  # the twin's 1e6 inputs never reached the statistics


# ============================================================================================ 2. AveragedModel
def _swa_program(batches, guard_opts=None):
    torch.manual_seed(0)
    model = SigmoidMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, **guard_opts) if guard_opts is not None else None
    swa = AveragedModel(model)  # after watch(): deep-copies the watched model
    for x, y in batches:
        loss = F.binary_cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss, inputs=x, targets=y)
        opt.zero_grad()
        swa.update_parameters(model)
    x_end = torch.randn(100, 4, generator=torch.Generator().manual_seed(3))
    out = swa(x_end)  # grad on, train mode, before close
    if guard is not None:
        guard.close()
    return model, swa, out, guard


def test_averaged_model_created_after_watch(tmp_path):
    """Pattern 2: ``AveragedModel(model)`` after ``watch()``, ``update_parameters`` every step, the averaged
    model's forward at the end: same weights and output as without boundguard, silent, copy inert."""
    batches = binary_batches(10)
    base_model, base_swa, base_out, _ = _swa_program(batches)
    model, swa, out, guard = _swa_program(batches, opts(tmp_path, bounds=(0, 1)))
    assert guard.engine.step == 10 and not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    assert same_weights(model, base_model) and same_weights(swa, base_swa)
    assert torch.equal(out, base_out) and int(swa.n_averaged) == 10
    assert live_hooks(swa) == []
    # the averaged model's 100-row forward is not a training statistic: the last check is step 10's
    # (steps 9..10, 2 batches of 32)
    snap = guard.engine.last_snapshot
    assert (snap.first_step, snap.step, snap.counts["pre"]) == (9, 10, 64), snap


def test_averaged_model_keeps_the_original_watched(tmp_path):
    """Pattern 2 (fault after the copy): a raw head with bounds=(0, 1), trained after ``AveragedModel`` copied
    the watched model (and its monitoring pre-hook), is reported on the original."""
    torch.manual_seed(0)
    model = RawMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, **opts(tmp_path, bounds=(0, 1))) as guard:
        swa = AveragedModel(model)
        for x, y in binary_batches(5):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
            swa.update_parameters(model)
    assert not guard.engine.disabled
    assert {"output_out_of_range", "missing_output_activation"} <= codes_at(guard.alerts, 1), guard.alerts
    assert live_hooks(swa) == []


# ============================================================================================ 3. torch.save / pickle
def test_torch_save_whole_model_each_epoch(tmp_path):
    """Pattern 3: ``torch.save(model, path)`` after each epoch; ``torch.load(..., weights_only=False)``
    predicts as the original, with no live boundguard hook; ``pickle`` too; training goes on watched."""
    torch.manual_seed(0)
    model = LogitMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs = [binary_batches(4, seed=s) for s in (1, 2, 3)]
    probe_x = torch.randn(16, 4, generator=torch.Generator().manual_seed(9))
    with watch(model, **opts(tmp_path, bounds=(0, 1))) as guard:
        for epoch, batches in enumerate(epochs):
            if epoch == 2:  # the last epoch brings a corrupted batch, after the saves
                batches = [(x.clone().fill_(NAN), y) if i == 1 else (x, y) for i, (x, y) in enumerate(batches)]
            for x, y in batches:
                loss = F.binary_cross_entropy_with_logits(model(x), y)
                loss.backward()
                opt.step()
                guard.step(loss=loss, inputs=x, targets=y)
                opt.zero_grad()
            if epoch == 2:
                break
            path = tmp_path / f"model-{epoch}.pt"
            torch.save(model, path)
            loaded = torch.load(path, weights_only=False)
            assert hooks_of(loaded) and live_hooks(loaded) == []
            assert same_weights(loaded, model)
            with torch.no_grad():
                assert torch.equal(loaded(probe_x), model(probe_x))
            pickled = pickle.loads(pickle.dumps(model))
            assert live_hooks(pickled) == []
            with torch.no_grad():
                assert torch.equal(pickled(probe_x), model(probe_x))
            # a loaded copy trained on (grad on, train mode) feeds nothing into the original's run
            loaded(torch.full((8, 4), NAN)).sum().backward()
            assert loud(guard.alerts) == [], guard.alerts
    assert guard.engine.step == 12 and not guard.engine.disabled
    assert "nonfinite_input" in codes_at(guard.alerts, 10), guard.alerts  # epoch 3, batch 2


def test_saved_copy_keeps_an_inserted_bound(tmp_path):
    """Pattern 3 with ``on_violation="bound"``: after the bound is inserted, the whole model saved with
    ``torch.save`` (and pickled) loads with the bound applied: bounded outputs, same as the original."""
    torch.manual_seed(0)
    model = RawMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe_x = 3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        raw = model(probe_x)
    assert raw.min() < 0 or raw.max() > 1  # the raw head really leaves (0, 1)
    with watch(model, **opts(tmp_path, bounds=(0, 1), on_violation="bound")) as guard:
        for x, y in binary_batches(6):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
        assert len(guard.bounds_inserted) == 1
        torch.save(model, tmp_path / "bounded.pt")
        blob = pickle.dumps(model)
    loaded = torch.load(tmp_path / "bounded.pt", weights_only=False)
    pickled = pickle.loads(blob)
    with torch.no_grad():
        ref = model(probe_x)
        for copy_ in (loaded, pickled):
            assert live_hooks(copy_) == []
            assert sum(isinstance(h, BoundHook) for h in hooks_of(copy_)) == 1
            out = copy_(probe_x)
            assert torch.equal(out, ref)
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # torch.save into a buffer as well (what checkpoint-to-memory code does)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(probe_x), ref)


# ============================================================================================ 4. torch.compile
def test_compile_a_deep_copy_of_a_watched_model(tmp_path):
    """Pattern 4: ``torch.compile(copy.deepcopy(model), backend="eager")`` of a watched model runs and gives
    the copy's output; the original keeps training, watched (a later NaN input is reported)."""
    torch.manual_seed(0)
    model = LogitMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = binary_batches(8)
    x_eval = torch.randn(20, 4, generator=torch.Generator().manual_seed(5))
    with watch(model, **opts(tmp_path, bounds=(0, 1))) as guard:
        for step, (x, y) in enumerate(batches, start=1):
            if step == 4:
                twin = copy.deepcopy(model)
                compiled = torch.compile(twin, backend="eager")
                out_compiled = compiled(x_eval)
                with torch.no_grad():
                    assert torch.allclose(out_compiled, twin(x_eval), rtol=0, atol=1e-7)
                out_compiled.sum().backward()  # the compiled copy trains as well
                assert twin.fc.weight.grad is not None
            if step == 7:
                x = x.clone()
                x[0, 0] = NAN
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
        assert [a for a in loud(guard.alerts) if a.step < 7] == [], guard.alerts
    assert guard.engine.step == 8 and not guard.engine.disabled
    assert "nonfinite_input" in codes_at(guard.alerts, 7), guard.alerts


# ============================================================================================ 5. GAN
class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, z):
        return torch.tanh(self.net(z))  # 4x4 "images" in [-1, 1]


def _gan_program(steps, guard_opts=None, nan_at=None):
    torch.manual_seed(0)
    G = Generator()
    D = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    guard = watch(G, **guard_opts) if guard_opts is not None else None
    data = torch.Generator().manual_seed(1)
    fixed_noise = torch.randn(64, 8, generator=data)
    samples = []
    for step in range(1, steps + 1):
        real = 0.8 * torch.tanh(torch.randn(32, 16, generator=data) + 0.5)
        z = torch.randn(32, 8, generator=data)
        if step == nan_at:
            z[5] = NAN
        fake = G(z)
        ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(D(real), ones)
                        + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        if step % 2 == 0:  # sample 64 images (another batch size), mid-step, generator in train mode
            with torch.no_grad():
                samples.append(G(fixed_noise))
        if guard is not None:
            guard.step(loss=g_loss)
        if step % 3 == 0:  # and once in a while between steps, from fresh noise with a bad row
            with torch.no_grad():
                noise = torch.randn(64, 8, generator=data)
                noise[0] = NAN  # what is sampled is the user's business, not a training statistic
                samples.append(G(noise))
    if guard is not None:
        guard.close()
    return G, D, samples, guard


def test_gan_generator_sampled_under_no_grad(tmp_path):
    """Pattern 5: a GAN whose generator is watched (bounds=(-1, 1), tanh output), sampled under
    ``no_grad`` with 64 rows every 2 steps: no false alert, same weights as without boundguard; a NaN
    latent in a training step is still reported."""
    base_g, base_d, base_samples, _ = _gan_program(10)
    G, D, samples, guard = _gan_program(10, opts(tmp_path / "ok", bounds=(-1, 1)))
    assert guard.engine.step == 10 and not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    assert same_weights(G, base_g) and same_weights(D, base_d)
    assert len(samples) == len(base_samples) == 8
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(samples, base_samples))
    snap = guard.engine.last_snapshot  # steps 9..10: two training forwards of 32 rows x 16 pixels
    assert (snap.first_step, snap.step) == (9, 10)
    assert snap.counts["pre"] == 2 * 32 * 16, snap.counts

    _, _, _, faulty = _gan_program(10, opts(tmp_path / "nan", bounds=(-1, 1)), nan_at=7)
    assert not faulty.engine.disabled
    assert "nonfinite_output" in codes_at(faulty.alerts, 7), faulty.alerts


# ============================================================================================ 6. validation
@pytest.mark.parametrize("mode", ["no_grad", "eval"], ids=["no_grad-train-mode", "eval-mode-grad-on"])
def test_validation_between_steps_without_model_eval(tmp_path, mode):
    """Pattern 6: validation on a larger batch between training steps, under ``no_grad`` with the model
    left in training mode (or in eval mode with gradients on); no alert, and the statistics count the
    training batches only; a grad-on forward after the last step that no ``guard.step`` ends is dropped."""
    torch.manual_seed(0)
    model = SigmoidMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = binary_batches(9)
    x_val, y_val = binary_batches(1, batch=256, seed=4)[0]
    x_val = x_val.clone()
    x_val[0] = NAN  # a validation set with a bad row: not a training statistic
    val_losses = []
    guard = watch(model, **opts(tmp_path, bounds=(0, 1)))
    for step, (x, y) in enumerate(batches, start=1):
        loss = F.binary_cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:  # mid-step validation, before guard.step
            if mode == "no_grad":
                with torch.no_grad():
                    val_losses.append(float(F.mse_loss(model(x_val[1:]), y_val[1:]).detach()))
                    model(x_val)
            else:
                model.eval()
                val_losses.append(float(F.mse_loss(model(x_val[1:]), y_val[1:]).detach()))
                model(x_val)
                model.train()
        guard.step(loss=loss, inputs=x, targets=y)
        if step % 3 == 0:  # and between steps
            with torch.no_grad():
                model(x_val)
    assert guard.engine.step == 9
    snap = guard.engine.last_snapshot  # the check at step 8: steps 5..8, four batches of 32
    assert (snap.first_step, snap.step, snap.counts["pre"]) == (5, 8, 4 * 32), snap
    final = model(x_val)  # grad on, train mode, after the last step: no guard.step() ends it
    guard.close()
    assert not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    assert len(val_losses) == 4 and all(math.isfinite(v) for v in val_losses)
    assert torch.isnan(final[0]).all()
    snap = guard.engine.last_snapshot  # the final check: step 9 alone; the 256-row forward is dropped
    assert (snap.first_step, snap.step, snap.counts["pre"]) == (9, 9, 32), snap
    assert snap.nonfinite("pre") == 0 and snap.nonfinite("pred") == 0


# ============================================================================================ 7. sequence model
class CellForecaster(nn.Module):
    """An LSTMCell unrolled by hand; its output Linear runs once per time step (teacher forcing)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.cell = nn.LSTMCell(1, hidden)
        self.out = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, seq, future: int = 0):
        b = seq.shape[0]
        h = c = seq.new_zeros(b, self.hidden)
        outs = []
        for t in range(seq.shape[1]):
            h, c = self.cell(seq[:, t], (h, c))
            outs.append(self.out(h))
        for _ in range(future):  # autoregressive: feed the last prediction back in
            h, c = self.cell(outs[-1], (h, c))
            outs.append(self.out(h))
        return torch.stack(outs, 1)


def _sine_batches(n, batch=16, steps=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phase = 6.28 * torch.rand(batch, 1, generator=g)
        t = torch.arange(steps + 1, dtype=torch.float32) * 0.3
        wave = torch.sin(phase + t).unsqueeze(-1)  # (batch, steps + 1, 1)
        out.append((wave[:, :-1], wave[:, 1:]))
    return out


def _forecaster_program(batches, guard_opts=None):
    torch.manual_seed(0)
    model = CellForecaster()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    guard = watch(model, **guard_opts) if guard_opts is not None else None
    forecasts = []
    for x, y in batches:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss, inputs=x, targets=y)
        opt.zero_grad()
        with torch.no_grad():  # forecast 20 "future" steps of a longer window, between steps
            forecasts.append(model(batches[0][0][:4], future=20))
    if guard is not None:
        guard.close()
    return model, forecasts, guard


def test_lstm_cell_forecaster_predicts_the_future_under_no_grad(tmp_path):
    """Pattern 7: an LSTMCell loop whose output Linear runs once per time step, SGD, 20-step forecasts
    under ``no_grad`` between training steps: silent, no ``nonfinite_output``, same weights."""
    batches = _sine_batches(10)
    base, base_fc, _ = _forecaster_program(batches)
    model, forecasts, guard = _forecaster_program(batches, opts(tmp_path, bounds=(-1, 1)))
    assert guard.engine.step == 10 and not guard.engine.disabled
    assert "nonfinite_output" not in {a.code for a in guard.alerts}
    assert loud(guard.alerts) == [], guard.alerts
    assert same_weights(model, base)
    assert forecasts[-1].shape == (4, 32, 1) and torch.equal(forecasts[-1], base_fc[-1])
    snap = guard.engine.last_snapshot  # steps 9..10: 2 batches x 16 rows x 12 time steps; the forecasts
    assert (snap.first_step, snap.step) == (9, 10)  # (4 rows x 32 steps each) are not counted
    assert snap.counts["pred"] == 2 * 16 * 12, snap.counts
    assert snap.counts["pre"] in (0, 2 * 16 * 12), snap.counts  # (0 while the stacked head's pre-activation
    assert snap.nonfinite("pred") == 0  # is not located: an info note)


def test_forecaster_targets_are_not_the_input_window(tmp_path):
    """Pattern 7: the inputs and the next-step targets are two windows (views) of one series tensor, as
    forecasting code slices them (``x, y = wave[:, :-1], wave[:, 1:]``); what boundguard reports as the
    targets' place must not be the model's input (``batch[0]``: the forward's first argument)."""
    _, _, guard = _forecaster_program(_sine_batches(3), opts(tmp_path, bounds=(-1, 1)))
    facts = guard.engine.monitor.facts
    assert facts.target_where != "batch[0]", facts


# ============================================================================================ 8. sparse inputs
N_NODES, N_FEATS = 3000, 64


class GraphConv(nn.Module):
    """Kipf & Welling's layer, as pygcn writes it: ``adj @ (x @ W) + b``, ``x`` dense or sparse."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fin, fout) / math.sqrt(fin))
        self.bias = nn.Parameter(torch.zeros(fout))

    def forward(self, x, adj):
        support = torch.sparse.mm(x, self.weight) if x.is_sparse else x @ self.weight
        return torch.sparse.mm(adj, support) + self.bias


class SparseGCN(nn.Module):
    """A two-layer GCN on sparse COO node features and a sparse normalised adjacency; returns logits."""

    def __init__(self):
        super().__init__()
        self.gc1 = GraphConv(N_FEATS, 16)
        self.gc2 = GraphConv(16, 1)

    def forward(self, feats, adj):
        return self.gc2(torch.relu(self.gc1(feats, adj)), adj)


class SparseGCNRootWeight(nn.Module):
    """The same GCN written with its first weight held by the model itself (a root ``nn.Parameter``, as a
    ViT holds ``pos_embed``) and the sigmoid in ``forward``: a healthy probability head."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(N_FEATS, 16) / math.sqrt(N_FEATS))
        self.gc2 = GraphConv(16, 1)

    def forward(self, feats, adj):
        h = torch.relu(torch.sparse.mm(adj, torch.sparse.mm(feats, self.w1)))
        return torch.sigmoid(self.gc2(h, adj))


def _graph(seed=2):
    g = torch.Generator().manual_seed(seed)
    nnz = N_NODES * 6
    idx = torch.stack([torch.randint(0, N_NODES, (nnz,), generator=g), torch.randint(0, N_FEATS, (nnz,), generator=g)])
    feats = torch.sparse_coo_tensor(idx, torch.rand(nnz, generator=g), (N_NODES, N_FEATS),
                                    check_invariants=True).coalesce()
    src, dst = torch.randint(0, N_NODES, (2, N_NODES * 4), generator=g)
    loops = torch.arange(N_NODES)
    ei = torch.stack([torch.cat([src, dst, loops]), torch.cat([dst, src, loops])])
    adj = torch.sparse_coo_tensor(ei, torch.ones(ei.shape[1]), (N_NODES, N_NODES), check_invariants=True).coalesce()
    deg = torch.sparse.sum(adj, 1).to_dense()
    i = adj.indices()
    adj = torch.sparse_coo_tensor(i, adj.values() / torch.sqrt(deg[i[0]] * deg[i[1]]), adj.shape,
                                  check_invariants=True).coalesce()
    score = torch.sparse.mm(feats, torch.linspace(-1, 1, N_FEATS).unsqueeze(1))
    labels = (score > score.median()).float()
    return feats, adj, labels


def _gcn_program(steps, guard_opts=None, fault=None, model_cls=SparseGCN):
    """``fault``: None, ``"raw_head"`` (the logits trained with MSE on 0/1 targets) or ``"nan_feature"`` (a
    NaN feature value at step 3)."""
    torch.manual_seed(0)
    feats, adj, y = _graph()
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = watch(model, **guard_opts) if guard_opts is not None else None
    for step in range(1, steps + 1):
        x = feats
        if fault == "nan_feature" and step == 3:  # a corrupted feature value
            v = feats.values().clone()
            v[10] = NAN
            x = torch.sparse_coo_tensor(feats.indices(), v, feats.shape, check_invariants=True).coalesce()
        out = model(x, adj)
        if fault == "raw_head":
            loss = F.mse_loss(out, y)
        elif model_cls is SparseGCNRootWeight:
            loss = F.binary_cross_entropy(out, y)
        else:
            loss = F.binary_cross_entropy_with_logits(out, y)
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss, inputs=x, targets=y)
        opt.zero_grad()
    if guard is not None:
        guard.close()
    return model, guard


def sparse_notes(guard) -> list:
    return [a for a in guard.alerts if a.code == "probe_incomplete" and "sparse" in a.message]


def test_sparse_node_features_are_skipped_with_one_note(tmp_path):
    """Pattern 8: sparse COO node features passed as ``inputs=`` (3000 nodes): the monitor stays on, one
    ``probe_incomplete`` info alert names the sparse inputs, and prediction, loss and gradients are still
    watched; weights equal those of the unwatched run."""
    base, _ = _gcn_program(6)
    model, guard = _gcn_program(6, opts(tmp_path, bounds=(0, 1)))
    assert guard.engine.step == 6 and not guard.engine.disabled
    assert loud(guard.alerts) == [], guard.alerts
    (note,) = sparse_notes(guard)
    assert note.severity == "info" and "inputs" in note.where and "sparse" in note.message
    assert [a for a in guard.alerts if a.code == "probe_incomplete"] == [note]
    assert same_weights(model, base)
    facts = guard.engine.monitor.facts
    assert facts.pre_where == "gc2" and facts.loss.name == "binary_cross_entropy_with_logits"
    snap = guard.engine.last_snapshot  # steps 5..6: logits, loss, targets and gradients still watched
    assert (snap.first_step, snap.step) == (5, 6)
    assert snap.counts["pre"] == 2 * N_NODES and snap.counts["target"] == 2 * N_NODES, snap.counts
    assert snap.counts["input"] == 0 and snap.counts["grad"] == 2
    assert list(snap.loss_steps) == [5, 6]


@pytest.mark.parametrize("fault", ["raw_head", "nan_feature"])
def test_sparse_inputs_faults_are_still_reported(tmp_path, fault):
    """Pattern 8 (faults): with the sparse inputs skipped, a raw head trained with MSE under bounds=(0, 1)
    and a NaN in the features (through the logits and the loss) are still reported."""
    _, guard = _gcn_program(5, opts(tmp_path, bounds=(0, 1)), fault=fault)
    assert not guard.engine.disabled
    if fault == "raw_head":
        assert "missing_output_activation" in codes_at(guard.alerts, 1), guard.alerts
    else:
        assert {"nonfinite_output", "nonfinite_loss"} <= codes_at(guard.alerts, 3), guard.alerts
    assert len(sparse_notes(guard)) == 1


def test_sparse_gcn_with_a_root_parameter(tmp_path):
    """Pattern 8, written as many GCNs are: the first weight is a parameter of the model itself and the
    sigmoid is applied in ``forward`` after the last GraphConv. Healthy: no alert of warning or above, the
    pre-activation is the last layer's output (gc2) and the activation a sigmoid."""
    model, guard = _gcn_program(4, opts(tmp_path, bounds=(0, 1)), model_cls=SparseGCNRootWeight)
    assert guard.engine.step == 4 and not guard.engine.disabled
    assert len(sparse_notes(guard)) == 1
    facts = guard.engine.monitor.facts
    assert (facts.pre_where, facts.activation) == ("gc2", "sigmoid"), facts
    assert loud(guard.alerts) == [], guard.alerts


# ============================================================================================ 10. numpy options
def test_numpy_scalars_as_options(tmp_path):
    """Pattern 10: ``bounds=(np.float32(0), np.float32(1))`` and ``check_every_n_steps=np.int64(5)`` in
    ``watch()``: checks at steps 1, 5, 10; the raw head is judged against (0, 1); files are strict JSON."""
    import json

    torch.manual_seed(0)
    model = RawMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, bounds=(np.float32(0), np.float32(1)), check_every_n_steps=np.int64(5),
               on_violation="log", strict=True, alerts_path=tmp_path / "alerts.jsonl") as guard:
        for x, y in binary_batches(10):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    assert not guard.engine.disabled and guard.engine.step == 10
    assert {"output_out_of_range", "missing_output_activation"} <= codes_at(guard.alerts, 1)
    b = guard.engine.session.bounds
    assert (float(b.lo), float(b.hi)) == (0.0, 1.0)
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    checks = [r["step"] for r in records if r["type"] == "stats"]
    assert checks == [1, 5, 10], checks
    for line in (tmp_path / "alerts.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    json.dumps(guard.state_dict(), allow_nan=False)  # the guard's state is plain JSON-able data
