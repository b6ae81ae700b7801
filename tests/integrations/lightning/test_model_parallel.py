"""Lightning's ``ModelParallelStrategy`` (FSDP2 on CPU, gloo) on 2 processes, one launch for three fits:
the seed's bug reported at step 1 with sharded parameters (the monitor never switches itself off), a NaN on
one rank halting both at the same check, and a healthy head with more predictions per check than float32
counts exactly raising nothing."""
from __future__ import annotations

import json
import textwrap

import pytest
from helpers import RANK_EXIT

pytest.importorskip("torch.distributed.fsdp")
strategies = pytest.importorskip("lightning.pytorch.strategies")
if not hasattr(strategies, "ModelParallelStrategy"):  # pragma: no cover - Lightning < 2.4
    pytest.skip("ModelParallelStrategy needs Lightning >= 2.4", allow_module_level=True)

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings, faulthandler
    faulthandler.dump_traceback_later(150, exit=True)  # a hang dumps every thread's stack and exits
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from boundguard.integrations.lightning import BoundGuard

    out = sys.argv[1]
    torch.set_num_threads(1)

    class Data(Dataset):
        def __init__(self, nan_at=None, width=1, n=4096):
            self.nan_at, self.width, self.n = nan_at, width, n
        def __len__(self):
            return self.n
        def __getitem__(self, i):  # DistributedSampler gives each index to one rank only
            g = torch.Generator().manual_seed(i)
            x = torch.randn(8, generator=g)
            if i == self.nan_at:
                x[0] = float("nan")
            return x, torch.rand(self.width, generator=g)

    class Model(L.LightningModule):
        def __init__(self, head, width=1):
            super().__init__()
            self.head = head
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
            self.fc = nn.Linear(16, width)
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.fc, mesh=mesh)
            fully_shard(self, mesh=mesh)
        def forward(self, x):
            z = self.fc(self.body(x))
            return torch.sigmoid(z) if self.head == "sigmoid" else z
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(name, head, steps, every, action, nan_at=None, batch=16, width=1):
        guard = BoundGuard(bounds=(0, 1), on_violation=action, check_every_n_steps=every,
                           alerts_path=os.path.join(out, name, "alerts.jsonl"))
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
        trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", max_steps=steps, callbacks=[guard],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        data = Data(nan_at, width, n=max(4096, 2 * batch * steps))  # full batches only
        trainer.fit(Model(head, width), DataLoader(data, batch_size=batch))
        snap, alerts = guard._engine.last_snapshot, guard.alerts
        return trainer.global_rank, {
            "step": trainer.global_step, "disabled": guard._session.disabled,
            "codes": sorted({a.code for a in alerts if a.severity != "info"}),
            "notes": [a.message for a in alerts if a.code == "probe_incomplete"],
            "first": sorted({a.code for a in alerts if a.step == 1}), "where": sorted({a.where for a in alerts}),
            "nan_step": next((a.step for a in alerts if a.code == "nonfinite_input"), None),
            "counts": snap.counts if snap else None}

    res = {}
    rank, res["seed"] = fit("seed", "raw", 5, 4, "log")
    rank, res["halt"] = fit("halt", "sigmoid", 40, 5, "halt", nan_at=193)
    # 1001 x 4099 predictions a step on each rank, the check of step 6 holds five: 20,515,495 a rank
    rank, res["big"] = fit("big", "sigmoid", 6, 6, "warn", batch=1001, width=4099)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
''') + RANK_EXIT


def test_model_parallel_strategy_on_two_ranks(tmp_path, launched):
    script = tmp_path / "model_parallel.py"
    script.write_text(SCRIPT)
    launched(script, tmp_path, 300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    a, b = r0["seed"], r1["seed"]  # sharded parameters: watched, never switched off, the user's names
    assert "missing_output_activation" in a["first"] and a["first"] == b["first"], (a, b)
    assert not a["disabled"] and not b["disabled"] and a["notes"] == [] and a["where"] == ["fc"], a
    assert a["counts"]["grad"] == 1  # the head's (sharded) gradients are seen
    lines = [json.loads(x) for x in (tmp_path / "seed" / "alerts.jsonl").read_text().splitlines()]
    assert [x["code"] for x in lines if x.get("event") == "new"].count("missing_output_activation") == 1

    a, b = r0["halt"], r1["halt"]  # a NaN in one rank's batch: both ranks stop at the same check
    assert a["step"] == b["step"] == a["nan_step"] == b["nan_step"], (a, b)
    assert a["step"] % 5 == 0 and a["step"] < 40 and "nonfinite_input" in a["codes"] and a["codes"] == b["codes"]

    a = r0["big"]  # healthy: nothing above info; the counts are exact
    assert a["codes"] == [] == r1["big"]["codes"], (a, r1["big"])
    assert a["counts"]["pred"] == 2 * 5 * 1001 * 4099, a
