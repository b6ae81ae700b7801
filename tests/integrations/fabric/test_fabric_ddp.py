"""Fabric DDP on 2 CPU processes (gloo), in a subprocess with a deadline: a fault on one rank only."""
from __future__ import annotations

import json
import textwrap

import pytest

from helpers import RANK_EXIT

pytest.importorskip("lightning.fabric")

SCRIPT = textwrap.dedent('''
    import faulthandler, json, os, sys, warnings
    from datetime import timedelta
    faulthandler.dump_traceback_later(150, exit=True)  # a hang dumps every thread's stack and exits
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    from boundguard.integrations.fabric import watch

    out = sys.argv[1]
    torch.set_num_threads(1)
    fabric = Fabric(strategy=DDPStrategy(timeout=timedelta(seconds=60)), devices=2, accelerator="cpu")
    fabric.launch()
    rank = fabric.global_rank

    def run(name, steps, nan_at=None, break_at=None, head="logits", every=4, batch=16, width=1):
        torch.manual_seed(0)
        layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, width)] + ([nn.Sigmoid()] if head == "sigmoid" else [])
        model = nn.Sequential(*layers)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model, opt = fabric.setup(model, opt)
        guard = watch(fabric, model, on_violation="halt" if head == "logits" else "warn",
                      bounds="auto" if head == "logits" else (0, 1), check_every_n_steps=every,
                      alerts_path=os.path.join(out, name, "alerts.jsonl"))
        g = torch.Generator().manual_seed(rank)
        stops, step = [], 0
        for step in range(1, steps + 1):
            x = torch.randn(batch, 8, generator=g)
            y = (x[:, :1] > 0).float() if head == "logits" else torch.rand(batch, width, generator=g)
            if rank == 1 and step == nan_at:
                x[0, 0] = float("nan")  # the fault is on rank 1 only
            if rank == 1 and step == break_at:  # rank 1's monitor fails at its next read-back
                def broken(*a, **k):
                    raise RuntimeError("injected internal error")
                guard.engine.reducer.read = broken
            out_ = model(x)
            loss = (nn.functional.binary_cross_entropy_with_logits(out_, y) if head == "logits"
                    else nn.functional.mse_loss(out_, y))
            fabric.backward(loss)
            opt.step()
            opt.zero_grad()
            guard.step(loss=loss, inputs=x, targets=y)
            stops.append(guard.should_stop)
            if guard.should_stop:
                break
        guard.close()
        return {"steps": step, "stops": stops, "disabled": guard.engine.disabled,
                "codes": sorted({a.code for a in guard.alerts}),
                "nan_step": next((a.step for a in guard.alerts if a.code == "nonfinite_input"), None),
                "where": sorted({a.where for a in guard.alerts}),
                "first": sorted({a.code for a in guard.alerts if a.step == 1}),
                "loud": sorted({a.code for a in guard.alerts if a.severity in ("warning", "error", "critical")}),
                "pred_n": guard.engine.last_snapshot.counts["pred"] if guard.engine.last_snapshot else None,
                "input_n": guard.engine.last_snapshot.counts["input"] if guard.engine.last_snapshot else None}

    result = {"halt": run("halt", 30, nan_at=6), "off": run("off", 12, break_at=3),
              "seed": run("seed", 5, head="raw"),  # the seed's bug: a raw head for targets in [0, 1]
              # 1001 x 16411 predictions a step, the check of step 3 holds two: 32,854,822 a rank
              "big": run("big", 3, head="sigmoid", every=3, batch=1001, width=16411)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
''') + RANK_EXIT


def test_fabric_ddp_fault_on_one_rank(tmp_path, two_ranks):
    script = tmp_path / "fabric_ddp.py"
    script.write_text(SCRIPT)
    two_ranks(script, tmp_path, timeout=200)  # (LOCAL_RANK set: fabric.launch() joins instead of spawning)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # NaN inputs on rank 1 at step 6: both ranks see them at the check of step 8 and stop there, with
    # should_stop identical on both ranks at every step
    h0, h1 = r0["halt"], r1["halt"]
    assert h0["steps"] == h1["steps"] == h0["nan_step"] == h1["nan_step"] == 8, (h0, h1)
    assert h0["stops"] == h1["stops"] == [False] * 7 + [True]
    assert "nonfinite_input" in h0["codes"] and "nonfinite_input" in h1["codes"]  # rank 0's inputs are clean
    assert h0["input_n"] == h1["input_n"] == 4 * 16 * 8 * 2  # the snapshot counts both ranks' inputs
    assert h0["where"] == h1["where"] and not any("_forward_module" in w for w in h0["where"])
    lines = [json.loads(line) for line in (tmp_path / "halt" / "alerts.jsonl").read_text().splitlines()]
    assert sum(1 for r in lines if r.get("code") == "nonfinite_input" and r.get("event") == "new") == 1

    # the seed's bug at step 1, written once; a healthy head past 2**24 predictions per check: silent, exact
    s0, s1 = r0["seed"], r1["seed"]
    assert {"output_out_of_range", "missing_output_activation"} <= set(s0["first"]) and s0["first"] == s1["first"]
    lines = [json.loads(line) for line in (tmp_path / "seed" / "alerts.jsonl").read_text().splitlines()]
    assert [r["code"] for r in lines if r.get("event") == "new"].count("output_out_of_range") == 1
    assert r0["big"]["loud"] == r1["big"]["loud"] == [] and r0["big"]["pred_n"] == 2 * 2 * 1001 * 16411

    # rank 1's monitor hits an internal error: at the next check both ranks switch off, nobody hangs
    o0, o1 = r0["off"], r1["off"]
    assert o0["steps"] == o1["steps"] == 12
    assert o0["disabled"] and o1["disabled"]
    assert o0["stops"] == o1["stops"] == [False] * 12
