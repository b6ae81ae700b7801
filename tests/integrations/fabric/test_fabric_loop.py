"""Fabric ``watch(fabric, model)`` in one process: the seed bug and its healthy twin, the wrapped module's
names, halt, bound surgery with apply_bounds, checkpoint state, options."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("lightning.fabric")

from lightning.fabric import Fabric  # noqa: E402

from boundguard import BoundGuardWarning  # noqa: E402
from boundguard.integrations.fabric import FabricGuard, apply_bounds, watch  # noqa: E402
from helpers import SEVERE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here trains on one torch thread


class Seed(nn.Module):
    """The seed's LSTM regressor for a target in [0, 1]; ``head`` is what follows the last Linear."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.lstm, self.fc, self.head = nn.LSTM(1, 8, batch_first=True), nn.Linear(8, 1), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(self.fc(out[:, -1]))


def _loop(head: nn.Module, steps: int = 6, seed: int = 0, **options):
    torch.manual_seed(seed)
    fabric = Fabric(accelerator="cpu", devices=1)
    module = Seed(head)
    model, opt = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=1e-2))
    guard = watch(fabric, model, **options)
    g = torch.Generator().manual_seed(seed)
    done = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        with guard:
            for _ in range(steps):
                done += 1
                x = torch.randn(16, 10, 1, generator=g)
                y = torch.sigmoid(x.sum(1))  # a probability-like target in (0, 1)
                loss = nn.functional.mse_loss(model(x), y)
                fabric.backward(loss)
                opt.step()
                opt.zero_grad()
                guard.step(loss=loss, inputs=x, targets=y)
                if guard.should_stop:
                    break
    return fabric, model, guard, done


def test_seed_bug_caught_at_step_1_and_healthy_twin_silent(tmp_path):
    _, _, bug, _ = _loop(nn.Identity(), bounds=(0, 1), check_every_n_steps=3, alerts_path=tmp_path / "bug.jsonl")
    at1 = {a.code: a for a in bug.alerts if a.step == 1}
    assert {"output_out_of_range", "missing_output_activation"} <= set(at1), bug.alerts
    assert at1["output_out_of_range"].where == "fc"  # the user's name, not _forward_module.fc
    assert (tmp_path / "bug.jsonl").read_text().count("output_out_of_range") >= 1
    _, _, ok, _ = _loop(nn.Sigmoid(), bounds=(0, 1), check_every_n_steps=3, alerts_path=tmp_path / "ok.jsonl")
    assert {a.code for a in ok.alerts if a.severity in SEVERE} == set(), ok.alerts
    assert ok._session.step == 6 and ok._session.facts.activation == "sigmoid"


def test_halt_sets_should_stop_at_the_check(tmp_path):
    _, _, guard, done = _loop(nn.Identity(), steps=10, bounds=(0, 1), on_violation="halt",
                              check_every_n_steps=5, alerts_path=tmp_path / "a.jsonl")
    assert done == 1 and guard.should_stop


def test_bound_inserted_on_the_inner_module_and_applied_to_a_fabric_module(tmp_path):
    fabric, model, guard, _ = _loop(nn.Identity(), bounds=(0, 1), on_violation="bound", check_every_n_steps=2,
                                    alerts_path=tmp_path / "a.jsonl")
    assert [r["module"] for r in guard.bounds_inserted] == ["fc"]
    x = torch.randn(64, 10, 1) * 5
    with torch.no_grad():
        assert 0.0 <= float(model(x).min()) and float(model(x).max()) <= 1.0
    # the state goes through fabric.save / fabric.load; a fresh wrapped model gets the recorded bound
    fabric.save(tmp_path / "ckpt.pt", {"model": model, "boundguard": guard})
    fresh = fabric.setup_module(Seed(nn.Identity()))
    again = watch(fabric, fresh, bounds=(0, 1), alerts_path=tmp_path / "b.jsonl")
    fabric.load(tmp_path / "ckpt.pt", {"model": fresh, "boundguard": again})
    assert [(a.code, a.step) for a in again.alerts] == [(a.code, a.step) for a in guard.alerts]
    assert again._session.step == guard._session.step == 6
    other = fabric.setup_module(Seed(nn.Identity()))
    assert [r["module"] for r in apply_bounds(other, tmp_path / "ckpt.pt")] == ["fc"]
    with torch.no_grad():
        assert 0.0 <= float(other(x).min()) and float(other(x).max()) <= 1.0
    again.close()


def test_invalid_options_and_arguments_are_rejected(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError) as info:
        watch(fabric, model, check_every=10)
    msg = str(info.value)
    for w in ("watch(fabric, model)", "'check_every'", "did you mean 'check_every_n_steps'", "bounds", "alerts_path"):
        assert w in msg, msg
    with pytest.raises(ValueError, match="on_violation"):
        watch(fabric, model, on_violation="stop")
    with pytest.raises(TypeError, match="needs a lightning Fabric"):
        watch(model, model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        watch(fabric, "model")
    assert isinstance(watch(fabric, model, alerts_path=tmp_path / "a.jsonl", on_violation="log"), FabricGuard)


def test_missing_fabric_names_the_extra(monkeypatch):
    for name in ("lightning.fabric.wrappers", "lightning_fabric.wrappers"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "boundguard.integrations.fabric", raising=False)
    with pytest.raises(ImportError, match=r"boundguard\[lightning\]"):
        importlib.import_module("boundguard.integrations.fabric")
