"""``make demo`` / ``python -m boundguard.demo``: the seed's LSTM, first as its user wrote it, then bounded.

Trains an LSTM regressor on a synthetic bounded series (the probability that a noisy price series
goes up) on the CPU, twice: with no output activation (what the seed's user had) and with
``on_violation="bound"``. Frameworks are imported inside :func:`main`, so importing this module
costs nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main", "bounded_series"]


def bounded_series(n: int = 2048, steps: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs: standardised returns ``(n, steps, 1)``; target: P(up) in (0, 1), a smooth function of them."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n, steps)).astype("float32")
    momentum = r[:, -5:].sum(1) / np.sqrt(5.0)
    y = 1.0 / (1.0 + np.exp(-2.5 * momentum))
    return r[:, :, None], y[:, None].astype("float32")


def _table(alerts) -> str:
    if not alerts:
        return "  (no alerts)"
    lines = [f"  {'severity':<9} {'code':<27} {'step':>5} {'seen':>5}  what was seen"]
    for a in alerts:
        lines.append(f"  {a.severity:<9} {a.code:<27} {a.step:>5} {a.count:>5}  {a.message}")
        lines.append(f"  {'':<50}fix: {a.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boundguard.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="boundguard_runs/demo", help="where the alerts/stats files and plot go")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    import logging

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning.pytorch as L
    from boundguard.integrations.lightning import BoundGuard

    for name in ("lightning.pytorch", "lightning.fabric", "boundguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    class LSTMRegressor(L.LightningModule):
        """The seed's model: LSTM + Linear head, no output activation, MSE."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(1, 32, batch_first=True)
            self.fc = nn.Linear(32, 1)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    x, y = bounded_series()
    xt = torch.from_numpy(x)
    out = Path(args.out)

    def run(on_violation: str, name: str):
        torch.manual_seed(0)
        model = LSTMRegressor()
        guard = BoundGuard(bounds=(0, 1), on_violation=on_violation, check_every_n_steps=25,
                           alerts_path=out / name / "alerts.jsonl")
        for f in (out / name).glob("*.jsonl"):
            f.unlink()  # a fresh run each time the demo runs
        loader = DataLoader(TensorDataset(xt, torch.from_numpy(y)), batch_size=32, shuffle=True)
        trainer = L.Trainer(max_steps=args.steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(model, loader)
        with torch.no_grad():
            model.eval()
            pred = model(xt * 3)  # a volatile regime: inputs three times as large
        return guard, pred

    print("boundguard demo: the seed's LSTM (no output activation, MSE) on a bounded target in (0, 1)\n")
    print(f"1) as the seed's user wrote it: Trainer(callbacks=[BoundGuard(bounds=(0, 1))]), {args.steps} steps")
    guard, pred = run("warn", "as_written")
    above = float((pred > 1).float().mean()) * 100
    below = float((pred < 0).float().mean()) * 100
    print(_table(guard.alerts))
    print(f"\n   predictions in a volatile regime span [{float(pred.min()):.3f}, {float(pred.max()):.3f}]: "
          f"{above:.1f}% above 1, {below:.1f}% below 0")
    print(f"   alerts file: {guard.alerts_path}\n")

    print("2) the same model with BoundGuard(bounds=(0, 1), on_violation='bound')")
    guard2, pred2 = run("bound", "bounded")
    for rec in guard2.bounds_inserted:
        print(f"   boundguard inserted {rec['kind']} on the output of '{rec['module']}' at step {rec['step']}")
    print(f"   predictions in the same regime span [{float(pred2.min()):.3f}, {float(pred2.max()):.3f}]: "
          f"{'all in [0, 1]' if float(pred2.min()) >= 0 and float(pred2.max()) <= 1 else 'OUT OF RANGE'}")
    late = [a for a in guard2.alerts if a.code == "output_out_of_range" and a.step > guard2.bounds_inserted[0]["step"]] \
        if guard2.bounds_inserted else []
    print(f"   range alerts after the bound: {len(late)}\n")

    try:
        from boundguard import cli
    except ImportError:
        cli = None
    if cli is not None and hasattr(cli, "main"):
        print(f"3) boundguard report {out / 'as_written'}")
        cli.main(["report", str(out / "as_written")])
        png = out / "as_written" / "run.png"
        code = cli.main(["plot", str(out / "as_written"), "-o", str(png)])
        if code == 0:
            print(f"\n   plot written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
