"""``make demo`` / ``python -m benchmarks.demo``: the seed's LSTM, first as its user wrote it, then bounded.

Trains the seed's LSTM regressor (:class:`benchmarks.seed.LSTMRegressor`) on a synthetic bounded
series (the probability that a noisy price series goes up) on the CPU, twice: with no output
activation (what the seed's user had) and with ``on_violation="bound"``; then reports the first run
with ``boundguard report`` and plots it with ``boundguard plot``. Frameworks are imported inside
:func:`main`, so importing this module costs nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "bounded_series"]


def bounded_series(n: int = 2048, steps: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs: standardised returns ``(n, steps, 1)``; target: P(up) in (0, 1), a smooth function of them.

    >>> x, y = bounded_series(n=8)
    >>> x.shape, y.shape, bool(((y > 0) & (y < 1)).all())
    ((8, 20, 1), (8, 1), True)
    """
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


def _setup() -> None:
    """Import the frameworks, quieten their loggers and warnings (not boundguard's: the demo shows what a
    user sees), and use at most two CPU threads."""
    import logging

    import torch

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import; overridden below)

    from boundguard import BoundGuardWarning

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # the frameworks' own notices; boundguard's lines stay, as users see them
    warnings.filterwarnings("always", category=BoundGuardWarning)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _run(x: np.ndarray, y: np.ndarray, out: Path, name: str, on_violation: str, steps: int) -> tuple[Any, Any]:
    """Train the seed's model under ``BoundGuard(bounds=(0, 1), on_violation=...)``; return the guard and
    the model's predictions in a volatile regime (inputs three times as large)."""
    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.seed import LSTMRegressor
    from boundguard.integrations.lightning import BoundGuard

    xt = torch.from_numpy(x)
    torch.manual_seed(0)
    model = LSTMRegressor()
    guard = BoundGuard(bounds=(0, 1), on_violation=on_violation, check_every_n_steps=25,
                       alerts_path=out / name / "alerts.jsonl")
    for f in (out / name).glob("*.jsonl"):
        f.unlink()  # a fresh run each time the demo runs
    loader = DataLoader(TensorDataset(xt, torch.from_numpy(y)), batch_size=32, shuffle=True)
    trainer = L.Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    with torch.no_grad():
        model.eval()
        pred = model(xt * 3)
    return guard, pred


def _as_written(x: np.ndarray, y: np.ndarray, out: Path, steps: int) -> None:
    print(f"1) as the seed's user wrote it: Trainer(callbacks=[BoundGuard(bounds=(0, 1))]), {steps} steps")
    guard, pred = _run(x, y, out, "as_written", "warn", steps)
    above = float((pred > 1).float().mean()) * 100
    below = float((pred < 0).float().mean()) * 100
    print(_table(guard.alerts))
    print(f"\n   predictions in a volatile regime span [{float(pred.min()):.3f}, {float(pred.max()):.3f}]: "
          f"{above:.1f}% above 1, {below:.1f}% below 0")
    print(f"   alerts file: {guard.alerts_path}\n")


def _bounded(x: np.ndarray, y: np.ndarray, out: Path, steps: int) -> None:
    print("2) the same model with BoundGuard(bounds=(0, 1), on_violation='bound')")
    guard, pred = _run(x, y, out, "bounded", "bound", steps)
    for rec in guard.bounds_inserted:
        print(f"   boundguard inserted {rec['kind']} on the output of '{rec['module']}' at step {rec['step']}")
    lo, hi = float(pred.min()), float(pred.max())
    print(f"   predictions in the same regime span [{lo:.3f}, {hi:.3f}]: "
          f"{'all in [0, 1]' if lo >= 0 and hi <= 1 else 'OUT OF RANGE'}")
    late = [a for a in guard.alerts if a.code == "output_out_of_range" and a.step > guard.bounds_inserted[0]["step"]] \
        if guard.bounds_inserted else []
    print(f"   range alerts after the bound: {len(late)}\n")


def _report(run_dir: Path) -> None:
    from boundguard import cli

    print(f"3) boundguard report {run_dir}")
    cli.main(["report", str(run_dir)])
    png = run_dir / "run.png"
    if cli.main(["plot", str(run_dir), "-o", str(png)]) == 0:
        print(f"\n   plot written to {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="boundguard_runs/demo", help="where the alerts/stats files and plot go")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    _setup()
    x, y = bounded_series()
    out = Path(args.out)
    print("boundguard demo: the seed's LSTM (no output activation, MSE) on a bounded target in (0, 1)\n")
    _as_written(x, y, out, args.steps)
    _bounded(x, y, out, args.steps)
    _report(out / "as_written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
