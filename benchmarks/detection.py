"""What the monitor catches: a labelled fault zoo run under boundguard and under the built-in alternatives.

    python -m benchmarks.detection                      # both frameworks, CPU, a few minutes; writes results
    python -m benchmarks.detection --smoke              # seconds: one faulty + one healthy program per framework
    python -m benchmarks.detection --framework lightning --only nan   # a subset, nothing written

Every program is a tiny model (an MLP or the seed's LSTM, batch 32) trained for a fixed number of steps
on synthetic data made fresh for every step, with one labelled fault (or none, for the healthy
programs) and the step the fault starts (``onset``; 1 for faults present from the start). Each program
runs once per tool, in the same process, with the same seed and the same batches:

- ``none``: no monitor (the wall-time baseline);
- ``boundguard``: ``BoundGuard(on_violation="log", check_every_n_steps=10)`` (``bounds="auto"`` unless
  the program declares its range, as its user would);
- Lightning: ``EarlyStopping(monitor="train_loss", check_finite=True)`` (``train_loss`` logged in
  ``training_step`` with ``on_epoch=True``; an epoch is 10 steps, so it judges as often as boundguard
  checks) and ``Trainer(detect_anomaly=True)`` (raises on NaN/Inf in backward);
- Keras: ``keras.callbacks.TerminateOnNaN()``.

Scoring. boundguard *detects* a program when an alert whose code belongs to the program's fault
family (``FAMILIES``) is raised at or after the onset; the lag is ``alert step - onset``, and the
program *passes* when the lag is at most one check interval (10 steps; a plateau's alert is by
definition ``patience`` steps late, plus up to one 20-step median window, so the plateau program is
allowed that much more). An alternative detects a program when it stops or raises at or after the
onset; EarlyStopping's "did not improve" stop counts only on a loss-dynamics fault (elsewhere it is
not a diagnosis of the fault and is listed, not counted). A *false alarm* is any alert of severity
warning or above on a healthy program (or before the onset of a faulty one); for an alternative,
any stop or raise there (a patience stop of EarlyStopping on a healthy run is listed, not counted). Wall
time is the sum over programs of each tool's ``fit`` time (median of ``--repeats`` runs, the order of the
tools rotating; model building excluded; one untimed warm-up run per framework first). These runs are
short (about 0.1 s of Lightning and 0.5 s of Keras each), so fixed per-run costs weigh heavily; the
steady-state step-time overhead is what ``benchmarks/overhead.py`` measures.

Keras runs in a child process of this script (``--framework keras``) with ``KERAS_BACKEND=tensorflow``.
Results land in ``benchmarks/results/detection-<date>-cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CHECK = 10  # boundguard's check_every_n_steps, and the steps per epoch the alternatives judge at
BATCH = 32
SEVERE = ("warning", "error", "critical")

#: The alert codes that count as catching a fault of each family.
FAMILIES: dict[str, tuple[str, ...]] = {
    "range": ("missing_output_activation", "output_out_of_range", "target_out_of_range", "output_saturated"),
    "config": ("activation_loss_mismatch", "regression_loss_on_probabilities"),
    "data": ("inputs_not_scaled", "nonfinite_input"),
    "dynamics": ("preactivation_exploding", "nonfinite_output", "nonfinite_loss", "loss_diverging",
                 "loss_spike", "loss_plateau"),
}
TOOLS = {"lightning": ("none", "boundguard", "earlystopping", "detect_anomaly"),
         "keras": ("none", "boundguard", "terminate_on_nan")}
TOOL_LABEL = {"none": "no monitor", "boundguard": "boundguard",
              "earlystopping": "EarlyStopping(check_finite)", "detect_anomaly": "detect_anomaly",
              "terminate_on_nan": "TerminateOnNaN"}


# --------------------------------------------------------------------------------------------- the zoo
@dataclass
class Program:
    """One labelled training program. ``family`` is ``"healthy"`` or a key of ``FAMILIES``.

    ``data``: the target kind (see :func:`make_data`); ``x_scale``: factor on the inputs; ``act``: the
    output activation; ``loss``: the loss (framework-specific name); ``lr_events``: ``{step: lr}`` set
    before that step's update; ``corrupt``: ``[(kind, step, value)]`` applied to one step's batch;
    ``guard``: options the program's user passes to BoundGuard (declared bounds, thresholds).
    """

    name: str
    framework: str
    family: str
    expected: Optional[str]
    onset: Optional[int]
    what: str
    data: str = "binary"
    arch: str = "mlp"
    out: int = 1
    act: str = "identity"
    loss: str = "mse"
    opt: str = "adam"
    lr: float = 1e-2
    lr_events: dict = field(default_factory=dict)
    corrupt: list = field(default_factory=list)
    x_scale: float = 1.0
    steps: int = 100
    guard: dict = field(default_factory=dict)
    allowance: int = 0
    smoke: bool = False


def zoo() -> list[Program]:
    P = Program
    lt, kr = "lightning", "keras"
    plateau = dict(thresholds={"loss_plateau": {"patience": 50}})
    return [
        # ---------------------------------------------------------------- Lightning, faulty
        P("seed LSTM, linear head, MSE on 0/1 targets", lt, "range", "missing_output_activation", 1,
          "the seed's bug: no output activation for a probability target", data="updown", arch="lstm",
          smoke=True),
        P("linear head, declared (0, 1), soft targets", lt, "range", "output_out_of_range", 1,
          "predictions leave the declared [0, 1]", data="unit", guard=dict(bounds=(0, 1))),
        P("sigmoid head, targets in [0, 10]", lt, "range", "target_out_of_range", 1,
          "targets the sigmoid can never reach", data="wide", act="sigmoid"),
        P("clamp(0, 1) head, MSE", lt, "range", "output_saturated", 1,
          "hard clipping pins predictions (no gradient)", act="clamp01"),
        P("softmax → CrossEntropyLoss", lt, "config", "activation_loss_mismatch", 1,
          "double softmax (the seed's Example 2)", data="classes", out=4, act="softmax", loss="ce"),
        P("sigmoid → BCEWithLogitsLoss", lt, "config", "activation_loss_mismatch", 1,
          "double sigmoid", act="sigmoid", loss="bce_logits"),
        P("NLLLoss on raw linear scores", lt, "config", "activation_loss_mismatch", 1,
          "a log-probability loss fed unbounded values", data="classes", out=4, loss="nll"),
        P("sigmoid + MSE on 0/1 targets", lt, "config", "regression_loss_on_probabilities", 1,
          "regression loss on probabilities", act="sigmoid"),
        P("inputs ×300 (raw units)", lt, "data", "inputs_not_scaled", 1,
          "unscaled input features", act="sigmoid", loss="bce", x_scale=300.0),
        P("NaN inputs at step 45", lt, "data", "nonfinite_input", 45,
          "4 rows of one batch carry NaN features", loss="bce_logits", corrupt=[("x_nan", 45, 4)]),
        P("NaN targets at step 33", lt, "data", "nonfinite_input", 33,
          "4 targets of one batch are NaN", loss="bce_logits", corrupt=[("y_nan", 33, 4)]),
        P("LR ×1000 at step 50 (separable logits)", lt, "dynamics", "preactivation_exploding", 50,
          "logits blow up while the loss stays small", data="separable", loss="bce_logits", opt="sgd",
          lr=0.5, lr_events={50: 500.0}),
        P("SGD lr=3 on regression", lt, "dynamics", "nonfinite_loss", 1,
          "huge learning rate → overflow → NaN loss", data="regression", opt="sgd", lr=3.0),
        P("corrupted batch (targets ×30) at step 55", lt, "dynamics", "loss_spike", 55,
          "one batch of bad labels", data="regression", corrupt=[("y_scale", 55, 30.0)]),
        P("Adam lr 1e-2 → 3.0 at step 50", lt, "dynamics", "loss_diverging", 50,
          "a learning-rate jump mid-run", data="regression", lr_events={50: 3.0}),
        P("LR → 0 at step 40 (plateau)", lt, "dynamics", "loss_plateau", 40,
          "training stops making progress", act="sigmoid", loss="bce", opt="sgd", lr=0.5,
          lr_events={40: 0.0}, steps=150, guard=plateau, allowance=70),
        # ---------------------------------------------------------------- Lightning, healthy
        P("healthy: seed LSTM, sigmoid + BCELoss", lt, "healthy", None, None, "", data="updown",
          arch="lstm", act="sigmoid", loss="bce", smoke=True),
        P("healthy: logits + BCEWithLogitsLoss, declared (0, 1)", lt, "healthy", None, None, "",
          loss="bce_logits", guard=dict(bounds=(0, 1))),
        P("healthy: logits + CrossEntropyLoss", lt, "healthy", None, None, "", data="classes", out=4, loss="ce"),
        P("healthy: log_softmax + NLLLoss", lt, "healthy", None, None, "", data="classes", out=4,
          act="log_softmax", loss="nll"),
        P("healthy: tanh + MSE, targets in [-0.8, 0.8], symmetric", lt, "healthy", None, None, "",
          data="sym", act="tanh", guard=dict(bounds="symmetric")),
        P("healthy: linear regression, unbounded targets", lt, "healthy", None, None, "", data="regression"),
        P("healthy: regression, Adam lr ÷10 at step 50", lt, "healthy", None, None, "", data="regression",
          lr_events={50: 1e-3}),
        P("healthy: sigmoid + BCELoss on soft targets, SGD", lt, "healthy", None, None, "", data="unit",
          act="sigmoid", loss="bce", opt="sgd", lr=0.5),
        P("healthy: GaussianNLLLoss regression (the loss goes negative)", lt, "healthy", None, None, "",
          data="small", out=2, loss="gaussian_nll", steps=300),
        # ---------------------------------------------------------------- Keras, faulty
        P("seed LSTM, Dense(1) linear, MSE on 0/1 targets", kr, "range", "missing_output_activation", 1,
          "the seed's bug: no output activation for a probability target", data="updown", arch="lstm",
          smoke=True),
        P("Dense(1) linear, declared (0, 1), soft targets", kr, "range", "output_out_of_range", 1,
          "predictions leave the declared [0, 1]", data="unit", guard=dict(bounds=(0, 1))),
        P("Dense(1, sigmoid), targets in [0, 10]", kr, "range", "target_out_of_range", 1,
          "targets the sigmoid can never reach", data="wide", act="sigmoid"),
        P("tf.clip_by_value(-1, 1) head on ±1 targets", kr, "range", "output_saturated", 1,
          "the seed's Example 3: hard clipping pins predictions", data="sign", act="clip11", lr=0.05,
          guard=dict(bounds="symmetric")),
        P("sigmoid + BinaryCrossentropy(from_logits=True)", kr, "config", "activation_loss_mismatch", 1,
          "from_logits=True after a sigmoid", act="sigmoid", loss="bce_logits"),
        P("softmax + SparseCategoricalCrossentropy(from_logits=True)", kr, "config", "activation_loss_mismatch", 1,
          "from_logits=True after a softmax", data="classes", out=4, act="softmax", loss="scce_logits"),
        P("Dense(1) linear + binary_crossentropy", kr, "config", "activation_loss_mismatch", 1,
          "a probability loss on a linear output (Keras clips silently)", loss="bce"),
        P("Dense(1, sigmoid) + mse on 0/1 targets", kr, "config", "regression_loss_on_probabilities", 1,
          "regression loss on probabilities", act="sigmoid"),
        P("inputs ×300 (raw units)", kr, "data", "inputs_not_scaled", 1,
          "unscaled input features", act="sigmoid", loss="bce", x_scale=300.0),
        P("NaN inputs at step 45", kr, "data", "nonfinite_input", 45,
          "4 rows of one batch carry NaN features", loss="bce_logits", corrupt=[("x_nan", 45, 4)]),
        P("NaN targets at step 33", kr, "data", "nonfinite_input", 33,
          "4 targets of one batch are NaN", loss="bce_logits", corrupt=[("y_nan", 33, 4)]),
        P("LR ×1000 at step 50 (separable logits)", kr, "dynamics", "preactivation_exploding", 50,
          "logits blow up while the loss stays small", data="separable", loss="bce_logits", opt="sgd",
          lr=0.5, lr_events={50: 500.0}),
        P("SGD lr=3 on regression", kr, "dynamics", "nonfinite_loss", 1,
          "huge learning rate → overflow → NaN loss", data="regression", opt="sgd", lr=3.0),
        P("corrupted batch (targets ×30) at step 55", kr, "dynamics", "loss_spike", 55,
          "one batch of bad labels", data="regression", corrupt=[("y_scale", 55, 30.0)]),
        P("Adam lr 1e-2 → 3.0 at step 50", kr, "dynamics", "loss_diverging", 50,
          "a learning-rate jump mid-run", data="regression", lr_events={50: 3.0}),
        P("LR → 0 at step 40 (plateau)", kr, "dynamics", "loss_plateau", 40,
          "training stops making progress", act="sigmoid", loss="bce", opt="sgd", lr=0.5,
          lr_events={40: 0.0}, steps=150, guard=plateau, allowance=70),
        # ---------------------------------------------------------------- Keras, healthy
        P("healthy: seed Example 1 (LSTM, sigmoid, binary_crossentropy)", kr, "healthy", None, None, "",
          data="updown", arch="lstm", act="sigmoid", loss="bce", smoke=True),
        P("healthy: Dense(1) logits + BinaryCrossentropy(from_logits=True)", kr, "healthy", None, None, "",
          loss="bce_logits"),
        P("healthy: Dense(4) logits + SparseCategoricalCrossentropy(from_logits=True)", kr, "healthy", None,
          None, "", data="classes", out=4, loss="scce_logits"),
        P("healthy: softmax + SparseCategoricalCrossentropy", kr, "healthy", None, None, "", data="classes",
          out=4, act="softmax", loss="scce"),
        P("healthy: tanh + mse, targets in [-0.8, 0.8], symmetric", kr, "healthy", None, None, "",
          data="sym", act="tanh", guard=dict(bounds="symmetric")),
        P("healthy: linear regression, unbounded targets", kr, "healthy", None, None, "", data="regression"),
        P("healthy: regression, Adam lr ÷10 at step 50", kr, "healthy", None, None, "", data="regression",
          lr_events={50: 1e-3}),
        P("healthy: sigmoid + binary_crossentropy on soft targets, SGD", kr, "healthy", None, None, "",
          data="unit", act="sigmoid", loss="bce", opt="sgd", lr=0.5),
        P("healthy: Gaussian NLL regression, custom loss (the loss goes negative)", kr, "healthy", None, None, "",
          data="small", out=2, loss="gaussian_nll", steps=300),
    ]


def make_data(p: Program, steps: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One batch per step (fresh samples every step), with the program's corruptions applied."""
    rng = np.random.default_rng(seed)
    n = steps * BATCH
    if p.arch == "lstm":
        r = rng.standard_normal((n, 21)).astype("float32")
        x = r[:, :20, None]
        s = r[:, 17:20].sum(1)
    else:
        x = rng.standard_normal((n, 8)).astype("float32")
        s = x[:, 0] + 0.5 * x[:, 1]
    k = p.data
    if k in ("binary", "updown"):
        y = (s > 0).astype("float32")[:, None]
    elif k == "separable":  # a margin around the boundary, so the logits can grow without bound
        s = s + np.sign(s) * 1.0
        x[:, 0] = s - 0.5 * x[:, 1]
        y = (s > 0).astype("float32")[:, None]
    elif k == "unit":
        y = (1 / (1 + np.exp(-2 * s))).astype("float32")[:, None]
    elif k == "wide":
        y = (10 / (1 + np.exp(-s))).astype("float32")[:, None]
    elif k == "sym":
        y = (0.8 * np.tanh(s)).astype("float32")[:, None]
    elif k == "sign":
        y = np.where(s > 0, 1.0, -1.0).astype("float32")[:, None]
    elif k == "classes":
        y = np.digitize(s, [-1.0, 0.0, 1.0]).astype("int64")
    elif k == "regression":
        y = (3 * s + 1).astype("float32")[:, None]
    elif k == "small":  # a regression target in small units, with noise (the variance is learnable)
        y = (0.1 * s + 0.03 * rng.standard_normal(n)).astype("float32")[:, None]
    else:
        raise ValueError(f"unknown data kind {k!r}")
    x = x * np.float32(p.x_scale)
    batches = [(x[i * BATCH:(i + 1) * BATCH].copy(), y[i * BATCH:(i + 1) * BATCH].copy()) for i in range(steps)]
    for kind, step, value in p.corrupt:
        bx, by = batches[step - 1]
        if kind == "x_nan":
            bx[:int(value), ..., 0] = np.nan
        elif kind == "y_nan":
            by[:int(value)] = np.nan
        elif kind == "y_scale":
            by *= np.float32(value)
        else:
            raise ValueError(f"unknown corruption {kind!r}")
    return batches


# --------------------------------------------------------------------------------------------- scoring
def score_boundguard(p: Program, alerts: list[dict]) -> dict:
    out: dict[str, Any] = {"codes": sorted({a["code"] for a in alerts}),
                           "severe_codes": sorted({a["code"] for a in alerts if a["severity"] in SEVERE})}
    if p.family == "healthy":
        fa = [a for a in alerts if a["severity"] in SEVERE]
        out["false_alarm"] = bool(fa)
        out["false_alarms"] = [f"{a['code']}@{a['step']}" for a in fa]
        return out
    fam = FAMILIES[p.family]
    hits = [a for a in alerts if a["code"] in fam and a["step"] >= p.onset]
    pre = [a for a in alerts if a["severity"] in SEVERE and a["step"] < p.onset]
    out["pre_onset_alarms"] = [f"{a['code']}@{a['step']}" for a in pre]
    out["false_alarm"] = bool(pre)
    exp = [a["step"] for a in alerts if a["code"] == p.expected and a["step"] >= p.onset]
    out["expected_seen"] = bool(exp)
    out["expected_lag"] = min(exp) - p.onset if exp else None
    if hits:
        first = min(hits, key=lambda a: (a["step"], a["code"] != p.expected))  # a tie goes to the expected code
        lag = first["step"] - p.onset
        out.update(detected=True, first_code=first["code"], alert_step=first["step"], lag=lag,
                   passed=lag <= CHECK + p.allowance)
    else:
        out.update(detected=False, first_code=None, alert_step=None, lag=None, passed=False)
    return out


def score_alternative(p: Program, fired_step: Optional[int], reason: Optional[str]) -> dict:
    out: dict[str, Any] = {"fired_step": fired_step, "reason": reason}
    if p.family == "healthy":
        # a patience stop on a healthy run is EarlyStopping doing its job (the loss converged), not an alarm
        out["false_alarm"] = fired_step is not None and reason != "no improvement"
        if fired_step is not None and reason == "no improvement":
            out["note"] = "stopped (no improvement): not an alarm"
        return out
    counts = fired_step is not None and fired_step >= p.onset
    if counts and reason == "no improvement" and p.family != "dynamics":
        counts = False  # a patience stop is not a diagnosis of a range, config or data fault
        out["note"] = "stopped (no improvement): not a diagnosis"
    out["false_alarm"] = fired_step is not None and fired_step < p.onset
    if counts:
        lag = fired_step - p.onset
        out.update(detected=True, lag=lag, passed=lag <= CHECK + p.allowance)
    else:
        out.update(detected=False, lag=None, passed=False)
    return out


def _alert_dicts(alerts) -> list[dict]:
    return [{"code": a.code, "severity": a.severity, "step": int(a.step)} for a in alerts]


# --------------------------------------------------------------------------------------------- Lightning
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "boundguard", "lightning", "absl"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_lightning(p: Program, tool: str, tmp: Path) -> dict:
    import torch
    from torch import nn
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import EarlyStopping
    from torch.utils.data import DataLoader, Dataset, Sampler

    batches = make_data(p, p.steps)
    tb = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

    class Clamp01(nn.Module):
        def forward(self, z):
            return torch.clamp(z, 0.0, 1.0)

    acts = {"identity": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "clamp01": Clamp01,
            "softmax": lambda: nn.Softmax(dim=1), "log_softmax": lambda: nn.LogSoftmax(dim=1)}
    losses = {"mse": nn.MSELoss, "bce": nn.BCELoss, "bce_logits": nn.BCEWithLogitsLoss,
              "ce": nn.CrossEntropyLoss, "nll": nn.NLLLoss, "gaussian_nll": nn.GaussianNLLLoss}

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            if p.arch == "lstm":
                self.lstm = nn.LSTM(1, 16, batch_first=True)
            else:
                self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
            self.fc = nn.Linear(16, p.out)
            self.act = acts[p.act]()
            self.loss_fn = losses[p.loss]()

        def forward(self, x):
            if p.arch == "lstm":
                h = self.lstm(x)[0][:, -1]
            else:
                h = self.body(x)
            return self.act(self.fc(h))

        def training_step(self, batch, batch_idx):
            x, y = batch
            if p.loss == "gaussian_nll":  # a mean and a log-variance column
                out = self(x)
                loss = self.loss_fn(out[:, :1], y, out[:, 1:].exp())
            else:
                loss = self.loss_fn(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            lr = p.lr_events.get(self.global_step + 1)
            if lr is not None:
                for g in self.trainer.optimizers[0].param_groups:
                    g["lr"] = lr

        def configure_optimizers(self):
            cls = torch.optim.SGD if p.opt == "sgd" else torch.optim.Adam
            return cls(self.parameters(), lr=p.lr)

    class Steps(Dataset):
        def __len__(self):
            return len(tb)

        def __getitem__(self, i):
            return tb[i]

    class Consecutive(Sampler):
        """CHECK batches per epoch, continuing where the last epoch stopped: step k always sees batch k."""

        def __init__(self):
            self.pos = 0

        def __len__(self):
            return CHECK

        def __iter__(self):
            for _ in range(CHECK):
                self.pos += 1  # before the yield: the loop knows the length and never asks for an 11th
                yield (self.pos - 1) % len(tb)

    class ES(EarlyStopping):
        fired: Optional[tuple] = None
        _trainer_step = 0

        def _evaluate_stopping_criteria(self, current):
            stop, reason = super()._evaluate_stopping_criteria(current)
            if stop and self.fired is None:
                self.fired = (self._trainer_step, "non-finite" if "not finite" in (reason or "") else
                              "no improvement" if "did not improve" in (reason or "") else (reason or "?"))
            return stop, reason

        def _run_early_stopping_check(self, trainer):
            self._trainer_step = trainer.global_step
            super()._run_early_stopping_check(trainer)

    torch.manual_seed(0)
    model = Net()
    callbacks: list = []
    guard = es = None
    if tool == "boundguard":
        from boundguard.integrations.lightning import BoundGuard

        guard = BoundGuard(on_violation="log", check_every_n_steps=CHECK,
                           alerts_path=tmp / f"{abs(hash((p.name, p.framework)))}.jsonl", **p.guard)
        callbacks.append(guard)
    elif tool == "earlystopping":
        es = ES(monitor="train_loss", check_finite=True, mode="min")
        callbacks.append(es)
    trainer = L.Trainer(max_steps=p.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        detect_anomaly=(tool == "detect_anomaly"), num_sanity_val_steps=0)
    loader = DataLoader(Steps(), batch_size=None, sampler=Consecutive())
    error = None
    t0 = time.perf_counter()
    try:
        trainer.fit(model, loader)
    except Exception as e:  # detect_anomaly raises; anything else is reported
        error = e
    seconds = time.perf_counter() - t0
    res: dict[str, Any] = {"seconds": round(seconds, 3), "steps_run": int(trainer.global_step)}
    if error is not None and not (tool == "detect_anomaly" and "nan" in str(error).lower()):
        res["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if tool == "boundguard":
        alerts = _alert_dicts(guard.alerts)
        res["alerts"] = alerts
        res.update(score_boundguard(p, alerts))
    elif tool == "earlystopping":
        step, reason = es.fired if es.fired else (None, None)
        res.update(score_alternative(p, step, reason))
    elif tool == "detect_anomaly":
        fired = error is not None and "nan" in str(error).lower()
        res.update(score_alternative(p, trainer.global_step + 1 if fired else None,
                                     "NaN/Inf in backward" if fired else None))
    return res


# --------------------------------------------------------------------------------------------- Keras
def run_keras(p: Program, tool: str, tmp: Path) -> dict:
    import keras
    import tensorflow as tf

    batches = make_data(p, p.steps)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    if p.loss in ("scce", "scce_logits"):
        y = y.reshape(-1)

    def clip11(z):
        return tf.clip_by_value(z, -1.0, 1.0)

    def gaussian_nll(y_true, y_pred):  # a mean and a log-variance column
        mu, logvar = y_pred[:, :1], y_pred[:, 1:]
        return 0.5 * keras.ops.mean(logvar + keras.ops.square(y_true - mu) / keras.ops.exp(logvar), axis=-1)

    act = {"identity": None, "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax", "clip11": clip11}[p.act]
    loss = {"mse": "mse", "bce": keras.losses.BinaryCrossentropy(),
            "bce_logits": keras.losses.BinaryCrossentropy(from_logits=True),
            "scce": keras.losses.SparseCategoricalCrossentropy(),
            "scce_logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "gaussian_nll": gaussian_nll}[p.loss]

    class LR(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            lr = p.lr_events.get(batch + 1)
            if lr is not None:
                self.model.optimizer.learning_rate = lr

    class TON(keras.callbacks.TerminateOnNaN):
        fired: Optional[int] = None

        def on_batch_end(self, batch, logs=None):
            super().on_batch_end(batch, logs)
            if self.model.stop_training and self.fired is None:
                self.fired = batch + 1

    keras.utils.set_random_seed(0)
    inp = keras.Input(x.shape[1:])
    h = keras.layers.LSTM(16)(inp) if p.arch == "lstm" else keras.layers.Dense(16, activation="tanh")(inp)
    model = keras.Model(inp, keras.layers.Dense(p.out, activation=act)(h))
    opt = keras.optimizers.SGD(p.lr) if p.opt == "sgd" else keras.optimizers.Adam(p.lr)
    model.compile(optimizer=opt, loss=loss)
    callbacks: list = [LR()] if p.lr_events else []
    guard = ton = None
    if tool == "boundguard":
        from boundguard.integrations.keras import BoundGuard

        guard = BoundGuard(on_violation="log", check_every_n_steps=CHECK,
                           alerts_path=tmp / f"{abs(hash((p.name, p.framework)))}.jsonl", **p.guard)
        callbacks.append(guard)
    elif tool == "terminate_on_nan":
        ton = TON()
        callbacks.append(ton)
    error = None
    steps_run = [0]

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps_run[0] = batch + 1

    t0 = time.perf_counter()
    try:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks + [Count()])
    except Exception as e:
        error = e
    seconds = time.perf_counter() - t0
    res: dict[str, Any] = {"seconds": round(seconds, 3), "steps_run": steps_run[0]}
    if error is not None:
        res["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if tool == "boundguard":
        alerts = _alert_dicts(guard.alerts)
        res["alerts"] = alerts
        res.update(score_boundguard(p, alerts))
    elif tool == "terminate_on_nan":
        res.update(score_alternative(p, ton.fired, "NaN/Inf loss" if ton.fired else None))
    return res


def _setup_framework(framework: str) -> None:
    if framework == "keras":
        os.environ["KERAS_BACKEND"] = "tensorflow"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.get_logger().setLevel("ERROR")
    else:
        import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import; _quiet overrides them)
        import torch

        torch.set_num_threads(1)  # the same for every tool; avoids thread contention on small CPUs
    _quiet()


def _outcome(r: dict) -> tuple:
    return (tuple((a["code"], a["step"]) for a in r.get("alerts", [])), r.get("fired_step"), r.get("error"))


def run_framework(framework: str, programs: list[Program], smoke: bool, repeats: int = 1) -> list[dict]:
    """Every program of ``framework`` under every tool, in this process, printing a line per program."""
    _setup_framework(framework)
    runner = run_keras if framework == "keras" else run_lightning
    out = []
    with tempfile.TemporaryDirectory(prefix="bg-detect-") as d:
        tmp = Path(d)
        warm = Program("warm-up", framework, "healthy", None, None, "", steps=CHECK)
        runner(warm, "none", tmp)
        tools = TOOLS[framework]
        for i, p in enumerate(programs):
            if smoke:
                p.steps = min(p.steps, 20)
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for rep in range(repeats):
                for j in range(len(tools)):  # the order rotates, so no tool always runs first
                    tool = tools[(i + rep + j) % len(tools)]
                    runs[tool].append(runner(p, tool, tmp))
            row = {"program": asdict(p), "tools": {}}
            for tool, rs in runs.items():
                res = dict(rs[0])  # detection from the first repeat; the time is the median over repeats
                times = [r["seconds"] for r in rs]
                res["seconds"] = round(float(np.median(times)), 3)
                res["seconds_runs"] = times
                res["same_outcome_every_repeat"] = all(_outcome(r) == _outcome(rs[0]) for r in rs)
                row["tools"][tool] = res
            out.append(row)
            print(_progress(row), flush=True)
    return out


def _progress(row: dict) -> str:
    p, t = row["program"], row["tools"]
    bg = t["boundguard"]
    if p["family"] == "healthy":
        s = "quiet" if not bg["false_alarm"] else "FALSE ALARM " + ",".join(bg["false_alarms"])
    else:
        s = (f"{bg['first_code']} lag {bg['lag']}" if bg["detected"] else "MISSED") + ("" if bg["passed"] else " (fail)")
    alts = [f"{k}={_alt_cell(v, p)}" for k, v in t.items() if k not in ("none", "boundguard")]
    return f"{p['framework']:<9} | {p['name'][:58]:<58} | boundguard: {s} | " + " ".join(alts)


def _alt_cell(v: dict, p: dict) -> str:
    if v.get("fired_step") is None:
        return "–"
    s = f"step {v['fired_step']}"
    if v.get("reason") == "no improvement":
        s += " (no improvement)"
    if not v.get("detected") and not v.get("false_alarm"):
        s += ", not counted"
    return s


# --------------------------------------------------------------------------------------------- summary
def summarise(rows: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for fw in ("lightning", "keras"):
        fr = [r for r in rows if r["program"]["framework"] == fw]
        if not fr:
            continue
        faulty = [r for r in fr if r["program"]["family"] != "healthy"]
        healthy = [r for r in fr if r["program"]["family"] == "healthy"]
        base_all = sum(r["tools"]["none"]["seconds"] for r in fr)
        base_h = sum(r["tools"]["none"]["seconds"] for r in healthy)
        tools = {}
        for tool in TOOLS[fw]:
            secs = sum(r["tools"][tool]["seconds"] for r in fr)
            secs_h = sum(r["tools"][tool]["seconds"] for r in healthy)
            s: dict[str, Any] = {"seconds_total": round(secs, 2), "seconds_healthy": round(secs_h, 2),
                                 "time_ratio_healthy": round(secs_h / base_h, 3) if base_h else None}
            if tool != "none":
                det = [r for r in faulty if r["tools"][tool]["detected"]]
                ok = [r for r in faulty if r["tools"][tool]["passed"]]
                fa = [r["program"]["name"] for r in healthy if r["tools"][tool]["false_alarm"]]
                pre = [r["program"]["name"] for r in faulty if r["tools"][tool]["false_alarm"]]
                lags = [r["tools"][tool]["lag"] for r in det]
                fam = {}
                for f in FAMILIES:
                    rs = [r for r in faulty if r["program"]["family"] == f]
                    if rs:
                        fam[f] = f"{sum(r['tools'][tool]['detected'] for r in rs)}/{len(rs)}"
                s.update(faulty=len(faulty), detected=len(det), within_interval=len(ok),
                         recall=round(len(det) / len(faulty), 3) if faulty else None,
                         recall_within_interval=round(len(ok) / len(faulty), 3) if faulty else None,
                         median_lag=float(np.median(lags)) if lags else None,
                         healthy=len(healthy), false_alarms=len(fa), false_alarm_programs=fa,
                         pre_onset_alarms=len(pre), pre_onset_programs=pre, by_family=fam)
            tools[tool] = s
        out[fw] = {"baseline_seconds": round(base_all, 2), "tools": tools}
    return out


def summary_text(summary: dict) -> str:
    lines = ["", "summary (per tool: recall = caught at or after onset; in-interval = within one check; "
                 "false alarms on healthy programs; fit wall time)"]
    for fw, s in summary.items():
        for tool, t in s["tools"].items():
            if tool == "none":
                lines.append(f"  {fw:<9} {TOOL_LABEL[tool]:<28} time {t['seconds_total']:.2f}s "
                             f"(healthy programs {t['seconds_healthy']:.2f}s)")
                continue
            lines.append(f"  {fw:<9} {TOOL_LABEL[tool]:<28} recall {t['detected']}/{t['faulty']}, "
                         f"in-interval {t['within_interval']}/{t['faulty']}, false alarms "
                         f"{t['false_alarms']}/{t['healthy']} (+{t['pre_onset_alarms']} before onset), "
                         f"time {t['seconds_total']:.2f}s (healthy ×{t['time_ratio_healthy']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- output
def meta(args, argv) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("torch", "lightning", "keras", "tensorflow-cpu", "tensorflow"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "boundguard", "integrations"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (library files modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": "cpu", "commit": commit,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count()},
            "versions": versions, "command": " ".join(["python -m benchmarks.detection", *argv]),
            "check_every_n_steps": CHECK, "batch": BATCH, "threads": 1, "repeats": args.repeats,
            "keras_backend": "tensorflow"}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"detection-{results['meta']['date']}-cpu"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(f"wrote {out / stem}.json and .md")


def _bg_cell(t: dict, p: dict) -> str:
    if p["family"] == "healthy":
        return "quiet" if not t["false_alarm"] else "**false alarm**: " + ", ".join(t["false_alarms"])
    if not t["detected"]:
        return "**missed**"
    s = f"`{t['first_code']}` +{t['lag']}"
    if not t["passed"]:
        s += " (**late**)"
    if not t["expected_seen"]:
        s += f" (no `{p['expected']}`)"
    elif t["first_code"] != p["expected"]:
        s += f"; `{p['expected']}` +{t['expected_lag']}"
    if t["pre_onset_alarms"]:
        s += " (alarm before onset: " + ", ".join(t["pre_onset_alarms"]) + ")"
    return s


def _alt_md(t: dict, p: dict) -> str:
    if t.get("fired_step") is None:
        return "–"
    if p["family"] == "healthy":
        if not t["false_alarm"]:
            return f"stopped step {t['fired_step']} ({t['reason']}; not an alarm)"
        return f"**fired** step {t['fired_step']} ({t['reason']})"
    if t["detected"]:
        s = f"+{t['lag']}"
        if t.get("reason") == "no improvement":
            s += " (no improvement)"
        return s
    if t.get("false_alarm"):
        return f"fired before onset (step {t['fired_step']}, {t['reason']})"
    return f"stopped step {t['fired_step']} ({t['reason']}; not counted)"


def markdown(r: dict) -> str:
    m = r["meta"]
    lines = [f"# boundguard detection — {m['date']}, {m['device']}", "",
             f"Machine: {m['machine']}  ", f"Versions: {m['versions']}  ", f"Commit: {m.get('commit')}  ",
             f"Command: `{m['command']}` (Keras on the {m['keras_backend']} backend, in a child process; "
             f"1 CPU thread per framework; batch {m['batch']}; boundguard `on_violation=\"log\"`, "
             f"`check_every_n_steps={m['check_every_n_steps']}`; each program run {m['repeats']}× per tool, "
             "detection from the first run, time the median)", "",
             "Cells: `code` +lag = the first alert of the fault's family, lag = steps from the fault's onset "
             f"to the alert (a pass is ≤ {CHECK}, one check interval; the plateau program is allowed its "
             "`patience` of 50 plus one 20-step median window more). Alternatives: +lag = steps from onset to "
             "its stop/raise; – = never fired. EarlyStopping judges `train_loss` (epoch mean) every "
             f"{CHECK}-step epoch; a \"did not improve\" stop counts only on loss-dynamics faults.", ""]
    for fw in ("lightning", "keras"):
        rows = [x for x in r["programs"] if x["program"]["framework"] == fw]
        if not rows:
            continue
        alts = [t for t in TOOLS[fw] if t not in ("none", "boundguard")]
        lines += [f"## {fw.capitalize()}", "",
                  "| program | family | expected code | onset | boundguard | " + " | ".join(TOOL_LABEL[a] for a in alts)
                  + " | other boundguard codes |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in alts) + " | --- |"]
        for x in rows:
            p, t = x["program"], x["tools"]
            bg = t["boundguard"]
            shown = {bg.get("first_code")} | {a.split("@")[0] for a in bg.get("false_alarms", [])}
            other = [c for c in bg["codes"] if c not in shown]
            lines.append(f"| {p['name']} | {p['family']} | {('`' + p['expected'] + '`') if p['expected'] else '–'} | "
                         f"{p['onset'] if p['onset'] else '–'} | {_bg_cell(bg, p)} | "
                         + " | ".join(_alt_md(t[a], p) for a in alts)
                         + f" | {', '.join(other) if other else '–'} |")
        lines.append("")
    lines += ["## Summary", "",
              "| framework | tool | recall | within one interval | median lag | by family (range/config/data/dynamics) "
              "| false alarms (healthy) | alarms before onset | fit time, all programs (s) | time on healthy vs none |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fw, s in r["summary"].items():
        for tool, t in s["tools"].items():
            if tool == "none":
                lines.append(f"| {fw} | {TOOL_LABEL[tool]} | – | – | – | – | – | – | {t['seconds_total']:.1f} | 1.00 |")
                continue
            fam = ", ".join(t["by_family"].get(f, "–") for f in FAMILIES)
            lines.append(f"| {fw} | {TOOL_LABEL[tool]} | {t['detected']}/{t['faulty']} ({t['recall']:.0%}) | "
                         f"{t['within_interval']}/{t['faulty']} | {t['median_lag'] if t['median_lag'] is not None else '–'} | "
                         f"{fam} | {t['false_alarms']}/{t['healthy']} | {t['pre_onset_alarms']} | "
                         f"{t['seconds_total']:.1f} | {t['time_ratio_healthy']:.2f} |")
    lines += ["", "A tool that stops a run early also shortens its fit time: EarlyStopping's ratio on healthy "
              "programs includes its patience stops."]
    unstable = [(x["program"]["framework"], x["program"]["name"], k) for x in r["programs"]
                for k, v in x["tools"].items() if not v.get("same_outcome_every_repeat", True)]
    lines += ["", "Outcomes that differed between repeats: "
              + ("none." if not unstable else ", ".join(f"{a} / {b} / {c}" for a, b, c in unstable))]
    errs = [(x["program"]["framework"], x["program"]["name"], k, v["error"]) for x in r["programs"]
            for k, v in x["tools"].items() if v.get("error")]
    if errs:
        lines += ["", "Runs that ended with an exception (not counted as detections):", ""]
        lines += [f"- {fw} / {name} / {tool}: `{e}`" for fw, name, tool, e in errs]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def select(programs: list[Program], framework: str, only: Optional[str], smoke: bool) -> list[Program]:
    out = [p for p in programs if p.framework == framework]
    if smoke:
        out = [p for p in out if p.smoke]
    if only:
        out = [p for p in out if only.lower() in p.name.lower()]
    return out


def _run_keras_child(args) -> tuple[list[dict], Optional[str]]:
    with tempfile.TemporaryDirectory(prefix="bg-detect-keras-") as d:
        out = Path(d) / "keras.json"
        cmd = [sys.executable, "-m", "benchmarks.detection", "--framework", "keras", "--json-out", str(out)]
        cmd += ["--repeats", str(args.repeats)]
        if args.smoke:
            cmd.append("--smoke")
        if args.only:
            cmd += ["--only", args.only]
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("keras ") or "Traceback" in line or "Error" in line:
                print(line, flush=True)
        if proc.returncode != 0 or not out.exists():
            return [], f"the Keras child exited {proc.returncode}:\n" + proc.stdout[-3000:]
        return json.loads(out.read_text()), None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detection", description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=["both", "lightning", "keras"], default="both")
    ap.add_argument("--smoke", action="store_true", help="one faulty + one healthy program per framework, 20 steps; "
                                                         "nothing written")
    ap.add_argument("--only", default=None, help="run only programs whose name contains this (nothing written)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per program and tool; the time reported is the "
                                                            "median (detection is from the first run)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # the Keras child's rows
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats = 1

    programs = zoo()
    t0 = time.perf_counter()
    if args.json_out:  # a child: one framework, rows to a file
        rows = run_framework(args.framework, select(programs, args.framework, args.only, args.smoke), args.smoke,
                             args.repeats)
        Path(args.json_out).write_text(json.dumps(rows))
        return 0
    rows: list[dict] = []
    failed = None
    if args.framework in ("both", "lightning"):
        sel = select(programs, "lightning", args.only, args.smoke)
        if sel:
            rows += run_framework("lightning", sel, args.smoke, args.repeats)
    if args.framework in ("both", "keras") and select(programs, "keras", args.only, args.smoke):
        krows, failed = _run_keras_child(args)
        rows += krows
    summary = summarise(rows)
    print(summary_text(summary))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f}s")
    if failed:
        print(failed, file=sys.stderr)
        return 1
    if not args.smoke and not args.only and args.framework == "both":
        results = {"meta": meta(args, argv), "programs": rows, "summary": summary,
                   "families": {k: list(v) for k, v in FAMILIES.items()}}
        write(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
