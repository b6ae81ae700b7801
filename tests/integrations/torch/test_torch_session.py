"""The torch adapter on the shared session: options named at the entry point, one bound per run with
the file agreeing with ``guard.alerts``, no stacked bounds, warnings attributed to the user's code, and
the final check at the end of a run."""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import BoundHook, apply_bounds, watch
from torch import nn

from boundguard import BoundGuardError, BoundGuardWarning


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def raw_head() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        m[2].weight.mul_(6.0)  # the raw output leaves [0, 1] at once
    return m


def fit(model, guard, steps, nan_at=(), wide_targets_at=()):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for i in range(1, steps + 1):
        x, y = torch.randn(16, 4, generator=g), torch.rand(16, 1, generator=g)
        if i in nan_at:
            x[0, 0] = float("nan")
        if i in wide_targets_at:
            y = y * 3
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, inputs=x, targets=y)
        if guard.should_stop:
            return i
    return steps


def test_unknown_option_names_watch_and_the_valid_options():
    with pytest.raises(TypeError) as info:
        watch(raw_head(), check_every=10)
    msg = str(info.value)
    assert "watch() got an unknown option 'check_every'" in msg
    assert "check_every_n_steps" in msg and "on_violation" in msg and "alerts_path" in msg


def test_bound_with_two_range_alerts_file_and_memory_agree(tmp_path):
    model = raw_head()
    path = tmp_path / "alerts.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, bounds=(0, 1), on_violation="bound", alerts_path=path) as guard:
            fit(model, guard, 3)
    memory = {a.code: a.action for a in guard.alerts if a.code in ("output_out_of_range", "missing_output_activation")}
    assert sorted(memory.values()) == ["bound", "warn"], memory
    records = [json.loads(x) for x in path.read_text().splitlines()]
    on_file = {r["code"]: r["action"] for r in records if r.get("event") == "new" and r["code"] in memory}
    assert on_file == memory
    assert len(guard.bounds_inserted) == 1
    with torch.no_grad():
        out = model(torch.randn(256, 4) * 10)
    assert out.min() >= 0 and out.max() <= 1


def test_bounds_inserted_is_a_copy(tmp_path):
    model = raw_head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, bounds=(0, 1), on_violation="bound", alerts_path=tmp_path / "a.jsonl") as guard:
            fit(model, guard, 2)
    guard.bounds_inserted[0]["kind"] = "tanh"
    guard.bounds_inserted.clear()
    assert [r["kind"] for r in guard.bounds_inserted] == ["sigmoid"]
    assert [r["kind"] for r in guard.state_dict()["monitor"]["inserted"]] == ["sigmoid"]


def test_apply_bounds_never_stacks_a_second_hook():
    model = raw_head()
    rec = {"module": "2", "path": [], "kind": "sigmoid", "lo": 0.0, "hi": 1.0, "dim": -1, "step": 1}
    apply_bounds(model, [rec])
    apply_bounds(model, [rec])
    vars(model).pop("_boundguard_bounds", None)  # the marker older versions relied on is gone...
    apply_bounds(model, [dict(rec)])  # ... and a third call still finds the hook on the module
    hooks = [h for h in model[2]._forward_hooks.values() if isinstance(h, BoundHook)]
    assert len(hooks) == 1
    x = torch.randn(8, 4)
    with torch.no_grad():
        z = model[2](model[1](model[0](x)))  # the hooked layer alone already applies the bound
        raw = F.linear(model[1](model[0](x)), model[2].weight, model[2].bias)
    torch.testing.assert_close(z, torch.sigmoid(raw))  # sigmoid(z), never sigmoid(sigmoid(z))


def test_warnings_point_at_the_training_loop(tmp_path):
    model = raw_head()
    with pytest.warns(BoundGuardWarning) as record:
        with watch(model, bounds=(0, 1), alerts_path=tmp_path / "a.jsonl") as guard:
            fit(model, guard, 1)
    assert record and {w.filename for w in record} == {__file__}


def test_the_end_of_a_run_is_judged(tmp_path):
    """Targets outside the bounds only in batches 58-60, with checks every 50 steps: seen at close()."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, bounds=(0, 1), alerts_path=tmp_path / "a.jsonl")
        fit(model, guard, 60, wide_targets_at=(58, 59, 60))
        assert not [a for a in guard.alerts if a.code == "target_out_of_range"]
        guard.close()
    (alert,) = [a for a in guard.alerts if a.code == "target_out_of_range"]
    assert alert.step == 60


@pytest.mark.parametrize("action", ["halt", "raise"])
def test_nan_tripwire_acts_at_the_step_of_the_nan(tmp_path, action):
    """A NaN at step 8 with checks every 50 steps: reported, and acted on, at step 8 (the loss's row is
    mirrored to the host at the end of each step; on the CPU that is plain memory)."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, bounds=(0, 1), on_violation=action, alerts_path=tmp_path / "a.jsonl")
        if action == "raise":
            with pytest.raises(BoundGuardError) as info:
                fit(model, guard, 40, nan_at=(8,))
            assert info.value.alert.step == 8
        else:
            assert fit(model, guard, 40, nan_at=(8,)) == 8
    codes = {a.code: a.step for a in guard.alerts}
    assert codes["nonfinite_input"] == 8 and codes["nonfinite_loss"] == 8


def test_nan_tripwire_checks_once_per_run_of_nan_steps(tmp_path):
    """With on_violation="warn", NaN at steps 8-20 makes one early check (step 8); the NaN seen again is
    counted at the regular check (step 50), not a check per step."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    checks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, bounds=(0, 1), check_every_n_steps=50, alerts_path=tmp_path / "a.jsonl")
        session_check = guard.engine.session.check

        def counting_check(*a, **k):
            checks.append(guard.engine.session.step)
            return session_check(*a, **k)

        guard.engine.session.check = counting_check
        fit(model, guard, 60, nan_at=tuple(range(8, 21)))
    assert checks == [1, 8, 50]


def test_warnings_work_when_the_training_script_runs_as_a_module(tmp_path):
    """``python -m pkg.train``: attributing the warning to ``__main__`` must not crash the run."""
    import subprocess
    import sys

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import torch\nfrom torch import nn\nfrom boundguard.integrations.torch import watch\n"
        "m = nn.Linear(4, 1)\n"
        f"with watch(m, bounds=(0, 1), alerts_path={str(tmp_path / 'a.jsonl')!r}) as g:\n"
        "    for _ in range(3):\n"
        "        x, y = torch.randn(8, 4) * 5, torch.rand(8, 1)\n"
        "        loss = nn.functional.mse_loss(m(x), y); loss.backward()\n"
        "        g.step(loss=loss, inputs=x, targets=y)\n"
        "print(sorted({a.code for a in g.alerts}), g.engine.disabled)\n")
    out = subprocess.run([sys.executable, "-m", "pkg.train"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "output_out_of_range" in out.stdout and out.stdout.strip().endswith("False")
    assert "BoundGuardWarning" in out.stderr and "train.py" in out.stderr


def test_the_first_check_says_what_is_watched(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="boundguard")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    with watch(model, bounds="auto", alerts_path=tmp_path / "alerts.jsonl") as guard:
        fit(model, guard, 2)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("boundguard watches:")]
    for part in ("prediction 3", "activation sigmoid", "loss mse_loss (regression)", "targets", "inputs",
                 "bounds [0, 1] (inferred"):
        assert part in line, (part, line)
    run = json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[0])
    assert run["type"] == "run" and run["watched"].startswith("boundguard watches: prediction 3")


class TwoHeads(nn.Module):
    """``forward`` returns (logits, aux): a main classifier and an auxiliary head on the same features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), self.aux(h)


@pytest.mark.parametrize("w_main,w_aux,watched", [(1.0, 0.4, "fc"), (0.3, 1.0, "aux")])
def test_the_head_whose_loss_weighs_most_is_watched(tmp_path, w_main, w_aux, watched):
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, alerts_path=tmp_path / "a.jsonl") as guard:
        for _ in range(3):
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            logits, aux = model(x)
            loss = w_main * F.cross_entropy(logits, y) + w_aux * F.cross_entropy(aux, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
    assert guard.engine.monitor.facts.pred_where == watched
    assert not [a for a in guard.alerts if a.severity != "info"]
    (note,) = [a for a in guard.alerts if a.code == "probe_incomplete"]
    assert "weighs most" in note.message


def test_apply_bounds_reads_a_plain_loop_checkpoint(tmp_path):
    """torch.save({"model": ..., "boundguard": guard.state_dict()}) → apply_bounds(fresh, path)."""
    torch.manual_seed(0)
    model = raw_head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, bounds=(0, 1), on_violation="bound", alerts_path=tmp_path / "a.jsonl") as guard:
            fit(model, guard, 2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "boundguard": guard.state_dict(), "epoch": 3}, path)
    fresh = raw_head()
    fresh.load_state_dict(torch.load(path)["model"])
    assert apply_bounds(fresh, path) == guard.bounds_inserted
    with torch.no_grad():
        out = fresh(torch.randn(64, 4) * 10)
    assert out.min() >= 0 and out.max() <= 1
