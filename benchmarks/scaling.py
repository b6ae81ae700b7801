"""How the torch Reducer's per-step cost scales with the size of the watched tensor.

    python -m benchmarks.scaling                                  # this tree, sizes 1e2 … 1e7, 5 repeats
    python -m benchmarks.scaling --baseline /tmp/bg-base          # and an older checkout, interleaved
    python -m benchmarks.scaling --baseline /tmp/bg-base --callgrind 10000,1000000
    python -m benchmarks.scaling --smoke                          # seconds: tiny sizes, 1 repeat

What is measured. One :class:`boundguard.integrations.torch.reducer.Reducer` watching one output tensor
(fp32, CPU, one torch thread) for a check interval of ``--interval`` steps (default 50): every step
``pred(t)`` + ``next_row()``, and at the end of the interval the check's ``read()``. The per-step figure
is the interval's time divided by its steps (the read amortised). Beside it, one ``torch.aminmax`` of
the same tensor per step (the floor: one pass over the elements), and the ratio reducer / aminmax.
Three cases: ``inside`` — bounds (0, 1), every value inside (the common case); ``straddle`` — bounds
(0, 1), values uniform on [-0.05, 1.05] (about 10% out of range); ``none`` — no bounds (standard
normal values).

Method. Wall clock: every cell (case x size) of a repeat times the reducer and aminmax back to back in
one process, over at least one whole interval and about ``--target`` seconds; a repeat is one worker
process that runs every cell once. With ``--baseline`` the repeats alternate between this tree and the
baseline checkout (a worker per repeat and version), so both see the same machine load. Reported: per
cell the median over repeats and [min–max]; the ratio is the median of the per-repeat ratios.

Which library a worker measures. Workers run as a script path (not ``-m``: ``-m`` would put the working
directory first on ``sys.path``) from a neutral folder; the baseline worker gets ``PYTHONPATH=<baseline>``.
The installed package is an editable install of this tree whose finder maps ``boundguard.integrations``
to ``<tree>/integrations``; a checkout lays that package out as ``<checkout>/integrations``, so the
baseline folder must hold a ``boundguard/integrations`` link to it (``--baseline`` creates it if
missing: ``ln -s ../integrations <baseline>/boundguard/integrations``). Every worker reports the files of
``boundguard`` and of the reducer module it imported, and the run stops if they are not under the folder
it meant to measure.

``--callgrind SIZES``: instructions per step of the same loop under valgrind's callgrind (one process
per version; counting switched on around each cell's interval by client requests and dumped per cell),
reducer and aminmax. Deterministic, unlike the wall clock; needs valgrind and a C compiler.

Results: ``benchmarks/results/scaling-<date>.md`` (the tables, then the full result as JSON) unless
``--smoke`` (then nothing is written unless ``--out`` is given). The last stdout line is
``result: <json>``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.parent / "results"
SIZES = [100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000]
SMOKE_SIZES = [100, 5_000]
CASES = {
    "inside": "bounds (0, 1), values inside (uniform on [0.01, 0.99])",
    "straddle": "bounds (0, 1), values straddling them (uniform on [-0.05, 1.05]: ~10% out of range)",
    "none": "no bounds (standard normal values)",
}
SHIM_SOURCE = r"""
#include <valgrind/callgrind.h>
int bg_running_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
void bg_count_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void bg_count_off(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void bg_dump(const char *what) { CALLGRIND_DUMP_STATS_AT(what); }
"""


# --------------------------------------------------------------------------------------------- worker side
def make_tensor(case: str, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed + n)
    if case == "inside":
        return torch.rand(n, generator=g) * 0.98 + 0.01
    if case == "straddle":
        return torch.rand(n, generator=g) * 1.1 - 0.05
    return torch.randn(n, generator=g)


def make_reducer(case: str, interval: int):
    import torch
    from boundguard.integrations.torch.reducer import Reducer
    from boundguard.session import CountingPlan

    red = Reducer(interval, torch.device("cpu"))
    if case in ("inside", "straddle"):
        red.apply(CountingPlan(lo=0.0, hi=1.0))
    return red


def run_interval(red, t, interval: int) -> None:
    """One check interval as the adapters drive it for one watched output: pred + next_row per step,
    then the check's read."""
    for _ in range(interval):
        red.pred(t)
        red.next_row()
    red.read()


def run_aminmax(t, steps: int) -> None:
    import torch

    for _ in range(steps):
        torch.aminmax(t)


def time_cell(case: str, n: int, interval: int, target_s: float) -> dict:
    """Per-step seconds of the reducer (whole intervals, read included) and of one aminmax, back to back."""
    t = make_tensor(case, n)
    red = make_reducer(case, interval)
    run_interval(red, t, min(interval, 3))  # warm-up: allocations, the first read, caches
    t0 = time.perf_counter()
    run_interval(red, t, interval)
    one = time.perf_counter() - t0
    k = int(target_s / max(one, 1e-9))  # more whole intervals, about target_s in all
    if k < 2:  # one interval is long enough: it is the measurement
        k, red_s = 1, one / interval
    else:
        k = min(k, 200)
        t0 = time.perf_counter()
        for _ in range(k):
            run_interval(red, t, interval)
        red_s = (time.perf_counter() - t0) / (k * interval)
    steps = k * interval
    run_aminmax(t, min(steps, 10))
    t0 = time.perf_counter()
    run_aminmax(t, steps)
    am_s = (time.perf_counter() - t0) / steps
    tripped = bool(getattr(red, "tripped", False))
    return {"case": case, "n": n, "reducer_ms": 1e3 * red_s, "aminmax_ms": 1e3 * am_s,
            "ratio": red_s / am_s if am_s > 0 else math.inf, "intervals": k, "tripped": tripped}


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def identify() -> dict:
    import boundguard
    import boundguard.integrations.torch.reducer as reducer
    import torch

    import hashlib

    src = Path(reducer.__file__).resolve()
    return {"boundguard": str(Path(boundguard.__file__).resolve()), "reducer": str(src),
            "reducer_sha256": hashlib.sha256(src.read_bytes()).hexdigest()[:12],
            "fast_count_min": getattr(reducer.Reducer, "FAST_COUNT_MIN", None),
            "lazy_bins": hasattr(reducer.Reducer, "_resolve"), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def worker_wall(sizes: list[int], cases: list[str], interval: int, target_s: float) -> dict:
    _setup_torch()
    cells = [time_cell(c, n, interval, target_s) for n in sizes for c in cases]
    return {"who": identify(), "cells": cells}


def worker_callgrind(sizes: list[int], cases: list[str], interval: int, shim: str) -> dict:
    """Under callgrind: counting on around each measured loop, one dump per (what, case, size)."""
    import ctypes

    _setup_torch()
    lib = ctypes.CDLL(shim)
    lib.bg_dump.argtypes = [ctypes.c_char_p]
    on, off, dump = lib.bg_count_on, lib.bg_count_off, lib.bg_dump
    if not lib.bg_running_on_valgrind():
        raise SystemExit("--callgrind worker: not running under valgrind")
    order = []
    import gc

    for n in sizes:
        for c in cases:
            t = make_tensor(c, n)
            red = make_reducer(c, interval)
            run_interval(red, t, min(interval, 3))  # warm-up: allocations, the first read
            run_aminmax(t, 2)
            gc.collect()
            on()
            run_interval(red, t, interval)
            off()
            dump(f"reducer|{c}|{n}".encode())
            on()
            run_aminmax(t, interval)
            off()
            dump(f"aminmax|{c}|{n}".encode())
            order += [f"reducer|{c}|{n}", f"aminmax|{c}|{n}"]
    return {"who": identify(), "order": order}


# --------------------------------------------------------------------------------------------- orchestrator
def worker_env(baseline: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if baseline is not None:
        env["PYTHONPATH"] = str(baseline)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    return env


def prepare_baseline(base: Path) -> None:
    """The checkout's ``integrations/`` folder is the package ``boundguard.integrations``: link it in."""
    if not (base / "boundguard" / "__init__.py").exists() or not (base / "integrations").is_dir():
        raise SystemExit(f"--baseline {base}: not a boundguard checkout (no boundguard/ and integrations/)")
    link = base / "boundguard" / "integrations"
    if not link.exists():
        link.symlink_to(Path("..") / "integrations")


def expect(who: dict, folder: Path, label: str) -> None:
    for key in ("boundguard", "reducer"):
        if not who[key].startswith(str(folder.resolve()) + os.sep):
            raise SystemExit(f"{label} worker imported {key} from {who[key]}, not from {folder}")


def spawn(args_list: list[str], baseline: Path | None, timeout: float, prefix: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bg-scaling-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = (prefix or []) + [sys.executable, str(HERE), "--worker", "--json", str(out)] + args_list
        proc = subprocess.run(cmd, cwd=tmp, env=worker_env(baseline), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        return res


def summarize(repeats: list[list[dict]]) -> list[dict]:
    """Per cell: median and [min, max] over repeats of reducer ms, aminmax ms and the per-repeat ratio."""
    by: dict[tuple[str, int], list[dict]] = {}
    for rep in repeats:
        for c in rep:
            by.setdefault((c["case"], c["n"]), []).append(c)
    out = []
    for (case, n), cs in by.items():
        row = {"case": case, "n": n, "repeats": len(cs), "tripped": any(c["tripped"] for c in cs)}
        for key in ("reducer_ms", "aminmax_ms", "ratio"):
            vals = [c[key] for c in cs]
            row[key] = statistics.median(vals)
            row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
        out.append(row)
    return out


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _spread(row: dict, key: str) -> str:
    return f"{_ms(row[key])} [{_ms(row[key + '_min'])}–{_ms(row[key + '_max'])}]"


def _ratio(row: dict) -> str:
    return f"{row['ratio']:.1f} [{row['ratio_min']:.1f}–{row['ratio_max']:.1f}]"


def _size(n: int) -> str:
    e = math.log10(n)
    return f"1e{int(round(e))}" if abs(e - round(e)) < 1e-9 else f"{n:,}"


def table(new: list[dict], old: list[dict] | None = None) -> str:
    """One markdown table: per case and size, reducer ms/step, aminmax ms/step, ratio (new, and old)."""
    head = "| case | elements | reducer ms / step [min–max] | aminmax ms / step [min–max] | reducer / aminmax |"
    sep = "| --- | ---: | ---: | ---: | ---: |"
    if old is not None:
        head += " old reducer ms / step [min–max] | old aminmax ms / step | old reducer / aminmax | new / old (reducer / aminmax) |"
        sep += " ---: | ---: | ---: | ---: |"
    lines = [head, sep]
    olds = {(r["case"], r["n"]): r for r in old or []}
    for r in sorted(new, key=lambda r: (list(CASES).index(r["case"]), r["n"])):
        line = f"| {r['case']} | {_size(r['n'])} | {_spread(r, 'reducer_ms')} | {_spread(r, 'aminmax_ms')} | {_ratio(r)} |"
        if old is not None:
            o = olds.get((r["case"], r["n"]))
            if o is None:
                line += " – | – | – | – |"
            else:
                line += (f" {_spread(o, 'reducer_ms')} | {_ms(o['aminmax_ms'])} | {_ratio(o)} |"
                         f" {r['ratio'] / o['ratio']:.2f} |")
        lines.append(line)
    return "\n".join(lines)


def read_dumps(prefix: Path) -> dict[str, int]:
    """{trigger: Ir} from callgrind's per-dump files ``<prefix>.N``."""
    out: dict[str, int] = {}
    for f in sorted(prefix.parent.glob(prefix.name + ".*")):
        trigger, total = None, None
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger:"):
                m = re.search(r"Client Request: (.*)$", line)
                trigger = m.group(1).strip() if m else line
            elif line.startswith("totals:") or (line.startswith("summary:") and total is None):
                total = int(line.split()[1])
        if trigger and "|" in trigger and total is not None:
            out[trigger] = total
    return out


def callgrind(sizes: list[int], cases: list[str], interval: int, baseline: Path | None) -> dict:
    if shutil.which("valgrind") is None:
        raise SystemExit("--callgrind: valgrind not on PATH")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit("--callgrind: no C compiler for the client-request shim")
    tmp = Path(tempfile.mkdtemp(prefix="bg-scaling-cg-"))
    try:
        src, lib = tmp / "shim.c", tmp / "shim.so"
        src.write_text(SHIM_SOURCE)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
        out = {}
        for label, base in (("new", None), ("old", baseline)):
            if label == "old" and baseline is None:
                continue
            prefix = tmp / f"cg-{label}.out"
            vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={prefix}",
                  f"--log-file={tmp}/vg-{label}.log"]
            env_extra = ["--sizes", ",".join(map(str, sizes)), "--cases", ",".join(cases), "--interval",
                         str(interval), "--shim", str(lib)]
            res = spawn(env_extra, base, timeout=3600, prefix=vg)
            if base is not None:
                expect(res["who"], base, "baseline callgrind")
            else:
                expect(res["who"], ROOT, "callgrind")
            counts = read_dumps(prefix)
            cells = []
            for n in sizes:
                for c in cases:
                    r, a = counts.get(f"reducer|{c}|{n}"), counts.get(f"aminmax|{c}|{n}")
                    if r is None or a is None:
                        raise SystemExit(f"callgrind: no dump for {c} {n} ({label}); see {tmp}")
                    cells.append({"case": c, "n": n, "reducer_ir": r / interval, "aminmax_ir": a / interval,
                                  "ratio": r / a})
            out[label] = {"who": res["who"], "cells": cells}
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def callgrind_table(cg: dict) -> str:
    old = {(c["case"], c["n"]): c for c in cg.get("old", {}).get("cells", [])}
    head = "| case | elements | reducer Ir / step | aminmax Ir / step | reducer / aminmax |"
    sep = "| --- | ---: | ---: | ---: | ---: |"
    if old:
        head += " old reducer Ir / step | old reducer / aminmax | reducer Ir / step, new − old |"
        sep += " ---: | ---: | ---: |"
    lines = [head, sep]
    for c in sorted(cg["new"]["cells"], key=lambda r: (r["n"], list(CASES).index(r["case"]))):
        line = (f"| {c['case']} | {_size(c['n'])} | {c['reducer_ir']:,.0f} | {c['aminmax_ir']:,.0f} | "
                f"{c['ratio']:.2f} |")
        o = old.get((c["case"], c["n"]))
        if old:
            line += (f" {o['reducer_ir']:,.0f} | {o['ratio']:.2f} | {c['reducer_ir'] - o['reducer_ir']:+,.0f} |"
                     if o else " – | – | – |")
        lines.append(line)
    return "\n".join(lines)


def meta(args, seconds: float) -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for mod in ("torch", "numpy"):
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count()},
            "versions": versions, "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]),
            "sizes": args.sizes, "cases": args.cases, "interval": args.interval, "repeats": args.repeats,
            "target_s": args.target, "baseline": str(args.baseline) if args.baseline else None,
            "seconds": round(seconds, 1)}


def markdown(r: dict) -> str:
    m = r["meta"]
    lines = [f"# boundguard torch Reducer: per-step cost against tensor size — {m['date']}", "",
             f"Machine: {m['machine']}  ", f"Versions: {m['versions']}  ",
             f"Library (new): `{r['new']['who'][0]['reducer']}` (sha256 {', '.join(r['new']['reducer_sha256'])})"
             + (f"; baseline (old): `{r['old']['who'][0]['reducer']}` (sha256 {', '.join(r['old']['reducer_sha256'])})"
                if r.get("old") else "") + "  ",
             f"Command: `{m['command']}` ({m['seconds']:.0f} s)  ",
             f"Method: `benchmarks/scaling.py`: one Reducer, one watched fp32 output tensor on the CPU, 1 torch "
             f"thread; per step `pred(t)` + `next_row()`, and `read()` at the end of each {m['interval']}-step "
             f"check interval, amortised; beside it one `torch.aminmax(t)` per step, timed right after in the same "
             f"process. {m['repeats']} repeats (one worker process each"
             + (", alternating new and old" if r.get("old") else "") + "); median [min–max] over repeats; the "
             "ratio is the median of the per-repeat ratios.", ""]
    for case, what in CASES.items():
        if case not in m["cases"]:
            continue
        lines.append(f"- `{case}`: {what}")
    lines += ["", table(r["new"]["summary"], r["old"]["summary"] if r.get("old") else None), ""]
    if r.get("callgrind"):
        lines += [f"Instructions per step under callgrind (one {m['interval']}-step interval after a 3-step warm-up "
                  "interval, read included; deterministic):", "", callgrind_table(r["callgrind"]), ""]
    lines += ["<details><summary>Full result (JSON)</summary>", "", "```json", json.dumps(r, indent=1), "```", "",
              "</details>"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated element counts (default 1e2 … 1e7)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--interval", type=int, default=50, help="check interval in steps (default 50)")
    p.add_argument("--repeats", type=int, default=None, help="worker processes per version (default 5; smoke 1)")
    p.add_argument("--target", type=float, default=None, help="seconds per timed cell, at least one interval "
                                                                "(default 0.3; smoke 0.02)")
    p.add_argument("--baseline", type=Path, default=None, help="an older checkout to measure the same way")
    p.add_argument("--callgrind", default=None, help="sizes to count under callgrind too, e.g. 10000,1000000")
    p.add_argument("--smoke", action="store_true", help="sizes 100 and 5000, 1 repeat, 5-step interval")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; smoke: none)")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--shim", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes = args.sizes or ",".join(map(str, SMOKE_SIZES))
        args.interval = 5 if args.interval == 50 else args.interval
    args.sizes = [int(float(s)) for s in (args.sizes or ",".join(map(str, SIZES))).split(",") if s.strip()]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; choose from {list(CASES)}")
    args.repeats = args.repeats or (1 if args.smoke else 5)
    args.target = args.target if args.target is not None else (0.02 if args.smoke else 0.3)

    if args.worker:
        if args.shim:
            res = worker_callgrind(args.sizes, args.cases, args.interval, args.shim)
        else:
            res = worker_wall(args.sizes, args.cases, args.interval, args.target)
        Path(args.json).write_text(json.dumps(res))
        return 0

    started = time.time()
    base = args.baseline.resolve() if args.baseline else None
    if base is not None:
        prepare_baseline(base)
    wargs = ["--sizes", ",".join(map(str, args.sizes)), "--cases", ",".join(args.cases), "--interval",
             str(args.interval), "--target", str(args.target)]
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    for rep in range(args.repeats):
        for label, folder in (("new", None), ("old", base)):
            if label == "old" and base is None:
                continue
            res = spawn(wargs, folder, timeout=3600)
            expect(res["who"], folder or ROOT, label)
            runs[label].append(res)
            print(f"repeat {rep + 1}/{args.repeats} {label}: {time.time() - started:.0f} s", flush=True)
    result: dict = {}
    for label, reps in runs.items():
        shas = sorted({r["who"]["reducer_sha256"] for r in reps})
        if len(shas) > 1:  # the tree was edited between repeats: say so, the repeats mix versions
            print(f"warning: {label} repeats imported different reducer sources {shas}", file=sys.stderr)
        if reps:
            result[label] = {"who": [r["who"] for r in reps][:1], "reducer_sha256": shas, "summary": summarize([r["cells"] for r in reps]),
                             "repeats": [r["cells"] for r in reps]}
    if args.callgrind:
        cg_sizes = [int(float(s)) for s in args.callgrind.split(",") if s.strip()]
        result["callgrind"] = callgrind(cg_sizes, args.cases, args.interval, base)
    result = {"meta": meta(args, time.time() - started), **result}
    print(table(result["new"]["summary"], result["old"]["summary"] if "old" in result else None))
    if "callgrind" in result:
        print()
        print(callgrind_table(result["callgrind"]))
    out = args.out if args.out is not None else (None if args.smoke else str(RESULTS))
    if out is not None:
        path = Path(out) / f"scaling-{result['meta']['date']}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(result) + "\n")
        print(f"wrote {path}")
    brief = {label: {f"{c['case']}/{c['n']}": round(c["ratio"], 3) for c in result[label]["summary"]}
             for label in ("new", "old") if label in result}
    print("result: " + json.dumps({"ratio": brief, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
