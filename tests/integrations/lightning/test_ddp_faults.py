"""DDP faults on 2 CPU processes (gloo), each in a subprocess with a deadline: a monitor that switches
itself off on one rank never hangs the other, and ``bounds="auto"`` is inferred from every rank's targets."""
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

    out, case = sys.argv[1], sys.argv[2]

    class Data(Dataset):
        def __len__(self):
            return 2048
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(8, generator=g)
            y = (x[:2].sum(0, keepdim=True) > 0).float()
            if case == "auto" and i % 2 == 1:  # DistributedSampler: odd indices go to rank 1
                y = y * 5.0  # rank 1's targets reach 5: no (0, 1) bound can be inferred globally
            return x, y

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 1)
        def forward(self, x):
            return self.fc(x)
        def training_step(self, batch, batch_idx):
            x, y = batch
            if case == "internal" and self.global_rank == 1 and self.global_step == 3:
                guard._engine.reducer = None  # an internal failure on rank 1 only (next statistics write)
                guard._engine.record_loss = None
            if case == "raise" and self.global_rank == 1 and self.global_step == 3:
                raise RuntimeError("user error on rank 1")
            return nn.functional.mse_loss(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    guard = BoundGuard(bounds="auto", on_violation="log", check_every_n_steps=5,
                       alerts_path=os.path.join(out, "alerts.jsonl"))
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=22, callbacks=[guard],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Model(), DataLoader(Data(), batch_size=16))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        b = guard._session.bounds
        json.dump({"step": trainer.global_step, "disabled": guard._session.disabled,
                   "codes": sorted({a.code for a in guard.alerts}),
                   "bounds": None if b is None else [b.lo, b.hi]}, f)
''') + RANK_EXIT


def _run(tmp_path, launched, case):
    script = tmp_path / "ddp_faults.py"
    script.write_text(SCRIPT)
    launched(script, tmp_path, 180, case)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_monitor_off_on_one_rank_switches_off_everywhere_without_a_hang(tmp_path, launched):
    ranks = _run(tmp_path, launched, "internal")
    assert [r["step"] for r in ranks] == [22, 22], ranks  # training finished on both ranks
    assert [r["disabled"] for r in ranks] == [True, True], ranks


def test_auto_bounds_are_inferred_from_every_ranks_targets(tmp_path, launched):
    ranks = _run(tmp_path, launched, "auto")
    assert ranks[0]["bounds"] == ranks[1]["bounds"] is None, ranks
    assert ranks[0]["codes"] == ranks[1]["codes"], ranks
    assert "nonfinite_output" not in ranks[0]["codes"]


def test_training_step_raising_on_one_rank_ends_both_with_python_errors(tmp_path, launched):
    """The user's ``training_step`` raises on rank 1 only: the partial check of ``on_exception`` runs no
    collective, so rank 1 reports the user's error and rank 0 a gloo connection error (a Python exception,
    not a SIGABRT from mismatched collectives), well within the deadline; the alerts file stays readable."""
    script = tmp_path / "ddp_faults.py"
    script.write_text(SCRIPT)
    proc = launched(script, tmp_path, 180, "raise", check=False)
    assert proc.returncode > 0, (proc.returncode, proc.stderr[-2000:])  # an exit status, not a signal
    assert "RuntimeError: user error on rank 1" in proc.stderr
    assert "mismatch" not in proc.stderr.lower() and "SIGABRT" not in proc.stderr
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["schema"] for x in lines)
