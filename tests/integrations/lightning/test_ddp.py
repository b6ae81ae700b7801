"""DDP on 2 CPU processes (gloo), in a subprocess with a timeout: one snapshot for all ranks, no hang."""
from __future__ import annotations

import json
import textwrap
from helpers import RANK_EXIT

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    import lightning.pytorch as L
    from boundguard.integrations.lightning import BoundGuard

    out = sys.argv[1]

    class Data(Dataset):
        def __len__(self):
            return 4096
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(8, generator=g)
            if i == 193:  # DistributedSampler gives each index to one rank only
                x[0] = float("nan")
            return x, (x[:2].sum(0, keepdim=True) > 0).float()

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 1)
        def forward(self, x):
            return torch.sigmoid(self.fc(x))
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    guard = BoundGuard(on_violation="halt", actions={"regression_loss_on_probabilities": "log"},
                       check_every_n_steps=5, alerts_path=os.path.join(out, "alerts.jsonl"))
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=50, callbacks=[guard],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Model(), DataLoader(Data(), batch_size=16))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"step": trainer.global_step, "codes": sorted({a.code for a in guard.alerts}),
                   "nan_step": next((a.step for a in guard.alerts if a.code == "nonfinite_input"), None),
                   "input_n": guard._engine.last_snapshot.counts["input"]}, f)
''') + RANK_EXIT


def test_ddp_two_ranks_halt_together(tmp_path, launched):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    launched(script, tmp_path, 240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the NaN sits in one rank's batch only; both ranks see it at the same check and stop there
    assert ranks[0]["step"] == ranks[1]["step"] == ranks[0]["nan_step"] == ranks[1]["nan_step"], ranks
    assert ranks[0]["step"] % 5 == 0 and ranks[0]["step"] < 50
    assert all("nonfinite_input" in r["codes"] for r in ranks), ranks
    # statistics are global: each snapshot counts the inputs of both ranks (5 steps x 16 x 8 x 2)
    assert ranks[0]["input_n"] == ranks[1]["input_n"] == 5 * 16 * 8 * 2
    # the alerts file is written once, by rank 0
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert sum(1 for r in lines if r["code"] == "nonfinite_input" and r["event"] == "new") == 1
