"""What the monitor costs: training-step time with and without boundguard, side by side in one process.

    python -m benchmarks.overhead                 # CPU, full configuration (a few minutes)
    python -m benchmarks.overhead --device cuda   # on a GPU machine
    python -m benchmarks.overhead --smoke         # seconds; what CI runs so the script cannot rot

Method: for each workload and setting, short training runs are repeated with the settings
interleaved (off, default, every step, bound, off, default, ...); each run's step time is the median
of the start-to-start intervals of its batches after a warm-up; the reported ratio is the median
(and min-max spread) over repeats of (setting / off of the same repeat). Host syncs between checks
are counted with a TorchDispatchMode (``aten._local_scalar_dense``) everywhere, and with
``torch.cuda.set_sync_debug_mode`` on CUDA; device→host transfers per check by counting copies to the
CPU during check steps. Memory: peak RSS / CUDA peak, and the monitor's host memory after 100k cheap
steps against 1k.

Results land in ``benchmarks/results/overhead-<date>-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "boundguard"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# --------------------------------------------------------------------------------------------- Lightning
def lightning_workloads(device: str):
    import torch
    from torch import nn
    import lightning.pytorch as L

    from benchmarks.seed import LSTMRegressor as SeedLSTM  # the seed's model (batch 32, 20 steps here)

    class WideMLP(L.LightningModule):
        """MLP classifier with a 10k-class head (raw logits + CrossEntropyLoss), batch 64."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10_000))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class SmallTransformer(L.LightningModule):
        """2-layer Transformer encoder (d=64, 4 heads) over 32 tokens, sigmoid head + BCE, batch 32."""

        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.inp = nn.Linear(8, 64)
            self.head = nn.Linear(64, 1)

        def forward(self, x):
            return torch.sigmoid(self.head(self.enc(self.inp(x)).mean(1)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.binary_cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    n = 4096
    xs = torch.randn(n, 20, 1, generator=g)
    data = {
        "seed LSTM": (SeedLSTM, xs, (xs[:, -3:, 0].sum(1, keepdim=True) > 0).float(), 32, (0, 1)),
        "MLP, 10k-class softmax head": (WideMLP, torch.randn(n, 64, generator=g),
                                         torch.randint(0, 10_000, (n,), generator=g), 64, "auto"),
        "Transformer encoder": (SmallTransformer, torch.randn(n, 32, 8, generator=g),
                                (torch.rand(n, 1, generator=g) > 0.5).float(), 32, "auto"),
    }
    return data


def time_lightning(factory, x, y, batch, bounds, setting: str, steps: int, warmup: int, device: str):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import lightning.pytorch as L
    from boundguard.integrations.lightning import BoundGuard

    stamps: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    callbacks = [Timer()]
    if setting != "off":
        opts = dict(bounds=bounds, on_violation="log", alerts_path=_tmp() / "alerts.jsonl")
        if setting == "every step":
            opts["check_every_n_steps"] = 1
        if setting == "bound inserted":
            opts["on_violation"] = "bound"
            opts["bounds"] = (0, 1) if bounds == (0, 1) else bounds
        callbacks.append(BoundGuard(**opts))
    torch.manual_seed(0)
    model = factory()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    trainer.fit(model, loader)
    return float(np.median(np.diff(stamps)[warmup:]))


_TMP = None


def _tmp() -> Path:
    global _TMP
    if _TMP is None:
        import tempfile

        _TMP = Path(tempfile.mkdtemp(prefix="bg-bench-"))
    return _TMP


# --------------------------------------------------------------------------------------------- Keras
def time_keras(setting: str, steps: int, warmup: int):
    import keras
    from boundguard.integrations.keras import BoundGuard

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stamps: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.stamps.append(time.perf_counter())

    rng = np.random.default_rng(0)
    r = rng.standard_normal((steps * 32, 21)).astype("float32")
    x, y = r[:, :20, None], (r[:, 17:20].sum(1) > 0).astype("float32")[:, None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20, 1)), keras.layers.LSTM(64), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    timer = Timer()
    cbs = [timer]
    if setting != "off":
        opts = dict(bounds=(0, 1), on_violation="log", alerts_path=_tmp() / "keras.jsonl")
        if setting == "every step":
            opts["check_every_n_steps"] = 1
        if setting == "bound inserted":
            opts["on_violation"] = "bound"
        cbs.append(BoundGuard(**opts))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=cbs, shuffle=True)
    return float(np.median(np.diff(timer.stamps)[warmup:]))


# --------------------------------------------------------------------------------------------- counters
def count_syncs_and_transfers(device: str, n: int = 10) -> dict:
    """Host syncs between checks and device→host copies per check, in a plain `watch` loop of 2×N steps."""
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    from boundguard.integrations.torch import watch

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.scalar = 0
            self.to_host = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._local_scalar_dense.default:
                self.scalar += 1
            # a transfer to the host: an explicit .to("cpu")/.cpu(), or a copy_ from a device into a CPU tensor
            if func is torch.ops.aten._to_copy.default:
                dst = kwargs.get("device")
                if dst is not None and torch.device(dst).type == "cpu":
                    self.to_host += 1
            elif func is torch.ops.aten.copy_.default:
                if args[0].device.type == "cpu" and args[1].device.type != "cpu":
                    self.to_host += 1
            return func(*args, **kwargs)

    dev = torch.device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, bounds=(0, 1), on_violation="log", check_every_n_steps=n, alerts_path=_tmp() / "sync.jsonl")
    between = Count()
    at_checks = Count()
    sync_warnings = 0
    for step in range(1, 2 * n + 1):
        x = torch.randn(32, 8, device=dev)
        y = torch.rand(32, 1, device=dev)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        is_check = step == 1 or step % n == 0
        mode = at_checks if is_check else between
        if device == "cuda" and not is_check:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mode:
                guard.step(loss=loss, inputs=x, targets=y)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            if not is_check:
                sync_warnings += sum("synchroniz" in str(w.message) for w in caught)
    guard.close()
    checks = 1 + (2 * n) // n
    return {
        "steps": 2 * n, "checks": checks,
        "host_reads_between_checks": between.scalar,
        "device_to_host_copies_between_checks": between.to_host,
        "cuda_sync_warnings_between_checks": sync_warnings if device == "cuda" else None,
        "device_to_host_copies_per_check": at_checks.to_host / checks,
    }


def memory_growth(short: int, long: int) -> dict:
    """The monitor's host memory (tracemalloc) after ``long`` cheap steps against ``short``."""
    import torch
    from torch import nn
    from boundguard.integrations.torch import watch

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    guard = watch(model, bounds=(0, 1), on_violation="log", check_every_n_steps=50, alerts_path=_tmp() / "mem.jsonl")
    x, y = torch.randn(8, 4), torch.rand(8, 1)
    tracemalloc.start()
    marks = {}
    for step in range(1, long + 1):
        loss = nn.functional.mse_loss(model(x), y)
        guard.step(loss=loss.detach(), inputs=x, targets=y)
        if step in (short, long):
            gc.collect()
            marks[step] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    guard.close()
    return {"steps_short": short, "steps_long": long, "bytes_after_short": marks[short],
            "bytes_after_long": marks[long], "growth_bytes": marks[long] - marks[short],
            "alerts": len(guard.alerts)}


# --------------------------------------------------------------------------------------------- main
def summarise(ratios: list[float]) -> dict:
    return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4), "max": round(max(ratios), 4),
            "n": len(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a seconds-long configuration (CI); results not written")
    p.add_argument("--no-keras", action="store_true")
    p.add_argument("--only", default=None, help="run only workloads whose name contains this")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    _quiet()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)  # the same for both arms; avoids the 2-core machine's thread contention
    if args.smoke:
        args.repeats, args.steps, args.warmup = 1, 12, 2
    settings = ["off", "default", "every step", "bound inserted"]
    results: dict = {"lightning": {}, "keras": {}}
    workloads = lightning_workloads(args.device)
    for name, (factory, x, y, batch, bounds) in workloads.items():
        if args.only and args.only not in name:
            continue
        if args.device == "cuda":
            x, y = x.cuda(), y.cuda()
        times: dict[str, list[float]] = {s: [] for s in settings}
        for _ in range(args.repeats):
            for s in settings:
                if s == "bound inserted" and bounds == "auto" and name != "seed LSTM":
                    continue  # bounds only insert on a range alert; the LSTM has one
                times[s].append(time_lightning(factory, x, y, batch, bounds, s, args.steps, args.warmup, args.device))
        base = times["off"]
        row = {"step_ms_off": round(1e3 * statistics.median(base), 4)}
        for s in settings[1:]:
            if times[s]:
                row[s] = summarise([t / b for t, b in zip(times[s], base)])
        results["lightning"][name] = row
        print(f"lightning | {name}: {json.dumps(row)}", flush=True)
    if not args.no_keras and (args.only is None or "keras" in args.only.lower() or "LSTM" in args.only):
        try:
            import keras  # noqa: F401

            times = {s: [] for s in settings}
            for _ in range(args.repeats):
                for s in settings:
                    times[s].append(time_keras(s, args.steps, args.warmup))
            base = times["off"]
            row = {"step_ms_off": round(1e3 * statistics.median(base), 4),
                   "backend": os.environ.get("KERAS_BACKEND", "tensorflow")}
            for s in settings[1:]:
                row[s] = summarise([t / b for t, b in zip(times[s], base)])
            results["keras"]["seed LSTM"] = row
            print(f"keras | seed LSTM: {json.dumps(row)}", flush=True)
        except ImportError as e:
            results["keras"]["error"] = f"keras adapter unavailable: {e}"
    results["syncs"] = count_syncs_and_transfers(args.device, n=5 if args.smoke else 25)
    print("syncs:", json.dumps(results["syncs"]), flush=True)
    results["memory"] = memory_growth(200 if args.smoke else 1_000, 1_000 if args.smoke else 100_000)
    print("memory:", json.dumps(results["memory"]), flush=True)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.device == "cuda":
        results["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    results["meta"] = meta(args)
    if not args.smoke:
        write(results, Path(args.out), args.device)
    return 0


def meta(args) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("lightning", "keras", "tensorflow"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count()}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": args.device, "machine": machine,
            "versions": versions, "command": "python -m benchmarks.overhead " + " ".join(sys.argv[1:]),
            "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup}


def write(results: dict, out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"overhead-{results['meta']['date']}-{device}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(f"wrote {out / stem}.json and .md")


def markdown(r: dict) -> str:
    m = r["meta"]
    lines = [f"# boundguard overhead — {m['date']}, {m['device']}", "",
             f"Machine: {m['machine']}  ", f"Versions: {m['versions']}  ",
             f"Command: `{m['command']}` ({m['repeats']} interleaved repeats × {m['steps']} steps, "
             f"first {m['warmup']} excluded)", "",
             "Step-time ratio with / without the callback (median over repeats, [min–max]):", "",
             "| framework | workload | step without (ms) | default (every 50) | every step | bound inserted |",
             "| --- | --- | --- | --- | --- | --- |"]
    for fw in ("lightning", "keras"):
        for name, row in r.get(fw, {}).items():
            if not isinstance(row, dict):
                continue
            cells = []
            for s in ("default", "every step", "bound inserted"):
                v = row.get(s)
                cells.append(f"{v['median']:.3f} [{v['min']:.3f}–{v['max']:.3f}]" if v else "–")
            lines.append(f"| {fw} | {name} | {row['step_ms_off']:.3f} | " + " | ".join(cells) + " |")
    s = r["syncs"]
    lines += ["", f"Host syncs between checks: {s['host_reads_between_checks']} host reads, "
                  f"{s['device_to_host_copies_between_checks']} device→host copies"
                  + (f", {s['cuda_sync_warnings_between_checks']} CUDA sync warnings" if s.get('cuda_sync_warnings_between_checks') is not None else "")
                  + f" over {s['steps']} steps; device→host copies per check: {s['device_to_host_copies_per_check']:.2f}.",
              f"Monitor host memory: {r['memory']['bytes_after_short']} B after {r['memory']['steps_short']} steps, "
              f"{r['memory']['bytes_after_long']} B after {r['memory']['steps_long']} (growth {r['memory']['growth_bytes']} B).",
              f"Peak RSS of the benchmark process: {r['peak_rss_mb']} MB."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
