"""A run killed with SIGKILL leaves readable files; torch.compile'd models train under the monitor."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from boundguard.integrations.torch import watch

WRITER = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from boundguard.integrations.torch import watch
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, bounds=(0, 1), on_violation="log", check_every_n_steps=1, alerts_path=sys.argv[1],
                  thresholds={"loss_spike": {"min_history": 2, "factor": 1.01, "mad_sigmas": 0, "min_rise": 0}})
    step = 0
    while True:  # runs until killed
        step += 1
        x, y = torch.randn(8, 4), torch.rand(8, 1)
        loss = nn.functional.mse_loss(model(x), y) * (1 + (step % 7))
        loss.backward(); opt.step(); opt.zero_grad()
        guard.step(loss=loss, inputs=x, targets=y)
''')


def test_sigkill_mid_run_leaves_parseable_files(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    alerts = tmp_path / "run" / "alerts.jsonl"
    stats = alerts.with_name("stats.jsonl")
    proc = subprocess.Popen([sys.executable, str(script), str(alerts)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not stats.exists() or stats.stat().st_size < 200_000):
            time.sleep(0.05)
        assert stats.exists(), "the run wrote no statistics"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    for path in (alerts, stats):
        text = path.read_text()
        lines = text.split("\n")
        complete, last = lines[:-1], lines[-1]
        assert len(complete) >= (10 if path == stats else 1)
        for line in complete:
            json.loads(line)  # every complete line parses
        if last:  # at most the last line is partial
            with pytest.raises(json.JSONDecodeError):
                json.loads(last)
    # the CLI reads past a partial last line without a traceback
    out = subprocess.run([sys.executable, "-m", "boundguard", "report", str(alerts.parent)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "loss_spike" in out.stdout


def test_torch_compile_trains_under_the_monitor(tmp_path):
    """The monitor's hooks run eagerly (torch.compiler.disable): one graph split at the watched layer,
    no crash, same alerts as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(compiled, bounds=(0, 1), on_violation="log", check_every_n_steps=5,
               alerts_path=tmp_path / "a.jsonl", strict=True) as guard:
        for i in range(12):
            if i == 6:
                graphs_at_6 = counters["stats"]["unique_graphs"]
            x, y = torch.randn(32, 8), torch.rand(32, 1)
            loss = nn.functional.mse_loss(compiled(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            guard.step(loss=loss, inputs=x, targets=y)
    assert {"output_out_of_range", "missing_output_activation"} <= {a.code for a in guard.alerts}
    # the split at the watched layer (a graph before and after it, and the loss), compiled once: no graph
    # per step, no recompilation as the monitor's buffers fill
    assert counters["stats"]["unique_graphs"] == graphs_at_6 <= 3, dict(counters["stats"])
