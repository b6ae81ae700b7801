"""halt, raise and bound end to end; checkpoint → resume; loggers; no side effects; internal errors."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from boundguard import BoundGuardError, BoundGuardWarning
from boundguard.integrations.lightning import BoundGuard, apply_bounds

from conftest import L, Tiny, data, fit, loader, trainer
from helpers import severe


def test_halt_stops_at_the_check(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="halt", check_every_n_steps=10, alerts_path=tmp_path / "a.jsonl")
    t = fit(Tiny(), x, y, g, max_steps=100)
    assert t.global_step == 1, "halt at the first check must stop before a second optimisation step"
    assert severe(g.alerts) & {"output_out_of_range", "missing_output_activation"}


def test_per_code_action_override(tmp_path):
    """Only the code named in `actions` halts; everything else is logged."""
    torch.manual_seed(0)
    x, y = data(kind="binary")
    script = lambda s, l: l * (float("nan") if s == 23 else 1.0)  # noqa: E731
    g = BoundGuard(bounds=(0, 1), on_violation="log", actions={"nonfinite_loss": "halt"}, check_every_n_steps=10,
                   alerts_path=tmp_path / "a.jsonl")
    t = fit(Tiny(script=script), x, y, g, max_steps=100)
    assert t.global_step == 24  # the NaN loss of step 24 trips a check there (the NaN tripwire)
    assert any(a.code == "nonfinite_loss" and a.action == "halt" for a in g.alerts)
    assert any(a.code == "missing_output_activation" and a.action == "log" for a in g.alerts)


def test_raise_carries_the_alert(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="raise", alerts_path=tmp_path / "a.jsonl")
    with pytest.raises(BoundGuardError) as info:
        fit(Tiny(), x, y, g, max_steps=20)
    assert info.value.alert.code in {"output_out_of_range", "missing_output_activation"}
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["schema"] == 1 for line in lines)


def test_warn_emits_boundguard_warning(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), alerts_path=tmp_path / "a.jsonl")
    t = trainer([g], max_steps=5)
    with pytest.warns(BoundGuardWarning, match="missing_output_activation"):
        t.fit(Tiny(), loader(x, y))


@pytest.mark.parametrize("bounds, lo, hi", [((0, 1), 0, 1), ("symmetric", -1, 1), ((2.0, 5.0), 2, 5)])
def test_bound_inserts_activation(tmp_path, bounds, lo, hi):
    torch.manual_seed(0)
    x, y = data(kind="unit")
    y = lo + (hi - lo) * y
    model = Tiny()
    keys = list(model.state_dict())
    g = BoundGuard(bounds=bounds, on_violation="bound", check_every_n_steps=10, alerts_path=tmp_path / "a.jsonl")
    fit(model, x, y, g, max_steps=40)
    with torch.no_grad():
        p = model(torch.from_numpy(x) * 50)  # extreme inputs: still in range
    assert float(p.min()) >= lo and float(p.max()) <= hi
    assert list(model.state_dict()) == keys
    assert g.bounds_inserted and g.bounds_inserted[0]["module"] == "fc"
    # after the bound, no new range alerts
    late = [a for a in g.alerts if a.code == "output_out_of_range" and a.step > 1]
    assert not late, late


def test_bound_softmax_for_distribution(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="onehot")
    model = Tiny(out=4)
    g = BoundGuard(bounds="distribution", on_violation="bound", check_every_n_steps=10, alerts_path=tmp_path / "a.jsonl")
    fit(model, x, y, g, max_steps=20)
    with torch.no_grad():
        p = model(torch.from_numpy(x))
    assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=1e-5) and float(p.min()) >= 0
    assert g.bounds_inserted[0]["kind"] == "softmax"


def test_checkpoint_resume_keeps_alerts_history_and_bound(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    model = Tiny()
    g = BoundGuard(bounds=(0, 1), on_violation="bound", check_every_n_steps=10, alerts_path=tmp_path / "a.jsonl")
    t = fit(model, x, y, g, max_steps=30)
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    n_alerts, window = len(g.alerts), list(g._engine.monitor.history.window)
    assert g.bounds_inserted

    fresh = Tiny()  # an unbounded model, as a user would rebuild it
    g2 = BoundGuard(bounds=(0, 1), on_violation="bound", check_every_n_steps=10, alerts_path=tmp_path / "a.jsonl")
    seen = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "window" not in seen:  # restored from the checkpoint, before any resumed step adds to it
                seen["window"] = list(g2._engine.monitor.history.window)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "p" not in seen:
                with torch.no_grad():
                    seen["p"] = pl_module(torch.from_numpy(x) * 50)

    t2 = trainer([g2, FirstStep()], max_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.fit(fresh, loader(x, y), ckpt_path=ckpt)
    assert float(seen["p"].min()) >= 0 and float(seen["p"].max()) <= 1, "bound not replayed on resume"
    assert len(g2.alerts) >= n_alerts and [a.code for a in g2.alerts[:n_alerts]] == [a.code for a in g.alerts]
    assert window, "the first run must leave a loss history to restore"
    assert seen["window"] == window, "the loss history was not restored from the checkpoint"
    assert g2._engine.step == 50
    # the public helper applies the same record for inference/export
    infer = Tiny()
    infer.load_state_dict(fresh.state_dict())
    apply_bounds(infer, ckpt)
    with torch.no_grad():
        assert torch.equal(infer(torch.from_numpy(x)), fresh(torch.from_numpy(x)))


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl")
    fit(Tiny(), x, y, g, max_steps=20)
    state = g.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain JSON data: nothing needs stringifying
    g2 = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=5)
    g2.load_state_dict(state)
    assert [(a.code, a.step, a.count) for a in g2.alerts] == [(a.code, a.step, a.count) for a in g.alerts]
    assert g2.state_dict()["monitor"]["history"] == state["monitor"]["history"]
    assert g.state_key == g2.state_key


def test_no_side_effects_bit_identical(tmp_path):
    def run(with_guard):
        torch.manual_seed(0)
        x, y = data(kind="binary")
        model = Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss())
        cbs = [BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl")] if with_guard else []
        t = trainer(cbs, max_steps=30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, loader(x, y, shuffle=True))
        return model.state_dict(), torch.rand(3)

    (a, ra), (b, rb) = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ra, rb), "the monitor consumed random numbers"


def test_logs_statistics_through_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=10)
    t = trainer([g], max_steps=30, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Tiny(), loader(x, y))
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "boundguard/output_max" in header and "boundguard/out_of_bounds_share" in header
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    logged = [r for r in rows if r.get("boundguard/output_max")]
    assert len(logged) == 4  # checks at steps 1, 10, 20, 30 only
    # alerts default to the logger's log dir
    assert g.alerts_path == tmp_path / "lightning_logs" / "version_0" / "alerts.jsonl"
    assert g.alerts_path.exists() and (g.alerts_path.parent / "stats.jsonl").exists()


def test_internal_error_switches_monitor_off(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / "a.jsonl")

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(g._engine.monitor, "judge", boom)
    t = trainer([g], max_steps=20)
    with pytest.warns(BoundGuardWarning, match="switched itself off"):
        t.fit(Tiny(), loader(x, y))
    assert t.global_step == 20 and g._engine.disabled

    strict = BoundGuard(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / "b.jsonl", strict=True)
    monkeypatch.setattr(strict._engine.monitor, "judge", boom)
    with pytest.raises(RuntimeError, match="synthetic"):
        trainer([strict], max_steps=5).fit(Tiny(), loader(x, y))


def test_pytorch_lightning_namespace(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from boundguard.integrations.pytorch_lightning import BoundGuard as PLGuard

    assert issubclass(PLGuard, pl.Callback)

    class PLTiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 1)

        def forward(self, x):
            return self.fc(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = data(kind="binary")
    g = PLGuard(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / "a.jsonl")
    t = pl.Trainer(max_steps=5, callbacks=[g], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(PLTiny(), loader(x, y))
    assert "missing_output_activation" in severe(g.alerts)


def test_missing_framework_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import boundguard.integrations.lightning\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pip install 'boundguard[lightning]'" in out


def test_zero_host_syncs_between_checks(tmp_path):
    """Count host reads (aten._local_scalar_dense) and copies with a dispatch mode over 2×N steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.scalar = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.scalar += 1
            return func(*args, **(kwargs or {}))

    def run(with_guard):
        torch.manual_seed(0)
        x, y = data(kind="binary")
        cbs = []
        if with_guard:
            cbs.append(BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=10,
                                  alerts_path=tmp_path / "a.jsonl"))
        counter = Count()

        class Between(L.Callback):  # count only between checks: steps 2..9 and 11..19
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx in (1, 10):
                    counter.__enter__()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx in (8, 18):
                    counter.__exit__(None, None, None)

        t = trainer([Between()] + cbs, max_steps=20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(Tiny(), loader(x, y))
        return counter.scalar

    assert run(True) == run(False)
