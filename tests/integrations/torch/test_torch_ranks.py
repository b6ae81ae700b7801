"""``watch()`` in plain loops under ``torchrun``: DistributedDataParallel and FSDP2 (``fully_shard``) on 2
CPU processes (gloo), one launch for every case, with a deadline. The seed's bug (a raw head with
bounds=(0, 1)) is reported at step 1 with one writer; a NaN on one rank halts both ranks at the same step;
a healthy head with more predictions per check than float32 counts exactly raises nothing; sharded
gradients are watched (their norm equals DDP's)."""
from __future__ import annotations

import json
import textwrap

import pytest

from helpers import RANK_EXIT

pytest.importorskip("torch.distributed.fsdp")

SCRIPT = textwrap.dedent('''
    import faulthandler, json, os, sys, warnings
    from datetime import timedelta
    faulthandler.dump_traceback_later(150, exit=True)  # a hang dumps every thread's stack and exits
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from boundguard.integrations.torch import watch

    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()

    def model_for(engine, head, width=1, din=8):
        torch.manual_seed(0)
        layers = [nn.Linear(din, 16), nn.Tanh(), nn.Linear(16, width)] + ([nn.Sigmoid()] if head == "sigmoid" else [])
        model = nn.Sequential(*layers)
        if engine == "ddp":
            return DDP(model)
        fully_shard(model[2])
        fully_shard(model)
        return model

    def run(name, engine, head, steps, every, nan_at=None, batch=16, width=1, bounds=(0, 1), action="halt"):
        model = model_for(engine, head, width)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = watch(model, bounds=bounds, on_violation=action, check_every_n_steps=every,
                      alerts_path=os.path.join(out, name, "alerts.jsonl"))
        g = torch.Generator().manual_seed(rank)
        stops, step, sumsq = [], 0, []
        for step in range(1, steps + 1):
            x = torch.randn(batch, 8, generator=g)
            y = torch.rand(batch, width, generator=g)
            if rank == 1 and step == nan_at:
                x[0, 0] = float("nan")  # the fault is on rank 1 only
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
            snap = guard.engine.last_snapshot
            if snap is not None and snap.step == step:
                sumsq.append(snap.values["grad.sumsq"])
            stops.append(guard.should_stop)
            if guard.should_stop:
                break
        guard.close()
        snap = guard.engine.last_snapshot
        alerts = guard.alerts
        return {"steps": step, "stops": stops, "disabled": guard.engine.disabled, "sumsq": sumsq,
                "codes": sorted({a.code for a in alerts if a.severity != "info"}),
                "notes": [a.message for a in alerts if a.code == "probe_incomplete"],
                "first": sorted({a.code for a in alerts if a.step == 1}),
                "nan_step": next((a.step for a in alerts if a.code == "nonfinite_input"), None),
                "where": sorted({a.where for a in alerts}),
                "counts": snap.counts if snap is not None else None}

    result = {
        "seed_ddp": run("seed_ddp", "ddp", "raw", 5, 4, action="log"),
        "seed_fsdp": run("seed_fsdp", "fsdp", "raw", 5, 4, action="log"),
        "halt_ddp": run("halt_ddp", "ddp", "sigmoid", 30, 4, nan_at=6),
        "halt_fsdp": run("halt_fsdp", "fsdp", "sigmoid", 30, 4, nan_at=6),
        # 1001 x 16411 predictions a step, the check of step 3 holds two: 32,854,822 a rank (float32 holds
        # only multiples of 4 there), 65,709,644 in all
        "big_ddp": run("big_ddp", "ddp", "sigmoid", 3, 3, batch=1001, width=16411, action="warn"),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    faulthandler.cancel_dump_traceback_later()
''') + RANK_EXIT


def test_plain_loops_on_two_ranks(tmp_path, two_ranks):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    two_ranks(script, tmp_path, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    for case in ("seed_ddp", "seed_fsdp"):  # the seed's bug at step 1, on both ranks, one writer
        a, b = r0[case], r1[case]
        assert {"output_out_of_range", "missing_output_activation"} <= set(a["first"]), (case, a)
        assert a["first"] == b["first"] and a["where"] == b["where"], (case, a, b)
        assert not a["disabled"] and not b["disabled"] and a["notes"] == [], (case, a)  # never switched off
        assert not any(w.startswith("module.") for w in a["where"]), a["where"]  # the user's names
        assert a["counts"]["grad"] == 1 and a["counts"]["pred"] == 2 * 16  # the last check: step 5, both ranks
        lines = [json.loads(x) for x in (tmp_path / case / "alerts.jsonl").read_text().splitlines()]
        new = [x["code"] for x in lines if x.get("event") == "new"]
        assert new.count("output_out_of_range") == 1, new  # rank 0 alone writes

    for case in ("halt_ddp", "halt_fsdp"):  # rank 1's NaN of step 6 stops both ranks at the check of step 8
        a, b = r0[case], r1[case]
        assert a["steps"] == b["steps"] == a["nan_step"] == b["nan_step"] == 8, (case, a, b)
        assert a["stops"] == b["stops"] == [False] * 7 + [True], (case, a, b)
        assert a["codes"] == b["codes"] and "nonfinite_input" in a["codes"], (case, a)
    # the head's gradient norm is the same whether DDP replicates it or FSDP2 shards it
    assert r0["halt_fsdp"]["sumsq"][:2] == pytest.approx(r0["halt_ddp"]["sumsq"][:2], rel=1e-4)
    assert r0["halt_fsdp"]["sumsq"][:2] == r1["halt_fsdp"]["sumsq"][:2]

    big = r0["big_ddp"]  # healthy: nothing above info, counts exact
    assert big["codes"] == [] and big["counts"]["pred"] == 2 * 2 * 1001 * 16411, big
    assert r1["big_ddp"]["codes"] == []
