"""Real short Lightning runs whose files the CLI tests read (made once per session)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("boundguard")
STEPS = 60
CHECK_EVERY = 10


@dataclass
class Runs:
    root: Path
    faulty: Path  # alerts file of a Linear head with no output activation, bounds (0, 1)
    healthy: Path  # run directory of a sigmoid + BCELoss model (no alerts file is written)
    lstm: Path  # alerts file with a custom name (lstm.jsonl, statistics in lstm.stats.jsonl)


def _train(kind: str, alerts_path: Path) -> list:
    import lightning as L
    import torch
    from boundguard.integrations.lightning import BoundGuard
    from torch import nn

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if kind == "lstm":
                self.rnn = nn.LSTM(4, 8, batch_first=True)
                self.head = nn.Linear(8, 1)
            else:
                self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            self.loss = nn.BCELoss() if kind == "healthy" else nn.MSELoss()

        def forward(self, x):
            if kind == "lstm":
                h, _ = self.rnn(x)
                return self.head(h[:, -1])
            z = self.net(x)
            return torch.sigmoid(z) if kind == "healthy" else z

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5 if kind == "faulty" else 0.1)

    torch.manual_seed(0)
    x = torch.randn(640, 6, 4) if kind == "lstm" else torch.randn(640, 8)
    y = ((x[:, -1, :1] if kind == "lstm" else x[:, :1]) > 0).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    guard = BoundGuard(bounds=(0, 1), on_violation="log", check_every_n_steps=CHECK_EVERY, alerts_path=alerts_path)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(), loader)
    return guard.alerts


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    faulty = root / "faulty" / "alerts.jsonl"
    healthy = root / "healthy" / "alerts.jsonl"
    lstm = root / "nested" / "lstm" / "lstm.jsonl"
    assert _train("faulty", faulty)
    assert not [a for a in _train("healthy", healthy) if a.severity != "info"]
    assert _train("lstm", lstm)
    return Runs(root, faulty, healthy.parent, lstm)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, module: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed console script (or ``python -m boundguard``) in a subprocess, output piped."""
    cmd = [sys.executable, "-m", "boundguard"] if module or not BIN.exists() else [str(BIN)]
    full_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    full_env.pop("NO_COLOR", None)
    return subprocess.run(cmd + [str(a) for a in args], check=False, capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=timeout)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def cli():
    """``cli(*args, cwd=None, env=None, module=False)`` runs the command and returns the CompletedProcess."""
    return run_cli


@pytest.fixture(scope="session")
def records():
    """``records(path)`` parses a JSON-lines file the tests trust."""
    return read_records
