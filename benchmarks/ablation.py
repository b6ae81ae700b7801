"""Which per-step work of the torch Reducer costs what, counted in instructions: ablations under callgrind.

    python -m benchmarks.ablation                       # all variants, Lightning default arm, 100-step window
    python -m benchmarks.ablation --variants off,default,no_trip --steps 100

The harness of :mod:`benchmarks.instructions` (one zygote under ``valgrind --tool=callgrind
--instr-atstart=no`` that imports torch + Lightning once and forks one child per variant; counting
switched on by client requests for ``--steps`` whole training steps after ``--warmup``; the seed LSTM on
Lightning, ``BoundGuard()``), with one change per variant: a method of
:class:`boundguard.integrations.torch.reducer.Reducer` replaced in the child before it trains. The
difference to ``default`` is then exactly what that piece costs (or what a proposed rewrite saves) over
the window, to the instruction (forks of one zygote differ by ~2e-4 of the total: ~3k per step).

Variants (``VARIANTS``): ``off`` (no callback), ``default``; ``no_trip`` (the NaN tripwire's per-step
look at the mirrored row dropped); ``no_mirror`` (``next_row`` as before the lazy bins and the tripwire:
no mirror copy, no lazy-bin resolve, no tripwire); ``trip_tolist`` (the tripwire reading the row with one
``tolist()`` and Python float compares instead of numpy fancy indexing, ``isnan`` and ``any``);
``loss_cells`` (``loss`` writing into precomputed 0-d views of the loss cells instead of indexing
``losses[i]`` every step); ``no_grad`` (the gradient-health reduction of the output layer's gradients,
``TorchEngine.record_grads``, dropped). These are measurement patches, not library changes.

The last stdout line is ``result: <json>``: instructions per step per variant and each one's difference
to ``default``.

``--diff A B --steps N``: for two callgrind files (``python -m benchmarks.instructions --keep`` keeps them)
the per-step difference A − B of the *inclusive* cost of the C entry points that Python code calls
(torch's ``THPVariable_*`` bindings, numpy's array/ufunc entry points, CPython's ``builtin_*``/method
wrappers): which tensor and array calls the monitor's per-step instructions go to.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script path by the zygote: benchmarks.instructions importable
    sys.path.append(str(ROOT))

VARIANTS = {
    "off": "no callback",
    "default": "BoundGuard() (check every 50 steps), unchanged",
    "no_trip": "Reducer._trip a no-op (no NaN tripwire look per step)",
    "no_mirror": "Reducer.next_row without mirror copy, lazy-bin resolve and tripwire (the old next_row)",
    "trip_tolist": "Reducer._trip on the CPU: row.tolist() + Python float compares",
    "loss_cells": "Reducer.loss into precomputed 0-d loss cells (no losses[i] view per step)",
    "no_grad": "TorchEngine.record_grads a no-op (no gradient-health reduction per step)",
}


def patch(variant: str) -> None:
    from boundguard.integrations.torch import reducer as rmod

    R = rmod.Reducer
    if variant == "no_grad":
        from boundguard.integrations.torch import engine

        engine.TorchEngine.record_grads = lambda self: None
    elif variant == "no_trip":
        R._trip = lambda self, slot: None
    elif variant == "no_mirror":
        def next_row(self):
            self._slot ^= 1
            self.row += 1
            self.i = min(self.i + 1, self.n_steps)
            self._written = set()
            if self.row == self.n_rows:
                self._fold()
        R.next_row = next_row
    elif variant == "trip_tolist":
        orig = R._trip
        inf = math.inf

        def _trip(self, slot):
            if self._cuda:
                return orig(self, slot)
            row = self._rows_np[self.row].tolist()
            for a in self._min_pos:
                lo, hi = row[a], row[a + 1]
                if lo != lo or hi != hi or lo == -inf or hi == inf:
                    self.tripped = True
                    return
            if self.loss_seen[self.i] and not math.isfinite(self._losses_list_src[self.i]):
                self.tripped = True
        init = R.__init__

        def __init__(self, *a, **k):
            init(self, *a, **k)
            self._min_pos = [int(i) for i in self._min_idx]
            self._losses_list_src = self._losses_np  # float(np.float32) per read, as before
        R.__init__ = __init__
        R._trip = _trip
    elif variant == "loss_cells":
        init = R.__init__

        def __init__(self, *a, **k):
            init(self, *a, **k)
            self._loss_cells = [self.losses[i] for i in range(self.n_steps + 1)]

        def loss(self, loss):
            l = loss.detach()
            if l.numel() != 1:
                if l.numel() == 0:
                    return
                l = l.float().mean()
            self._loss_cells[self.i].copy_(l.reshape(()))
            self.loss_seen[self.i] = True
        R.__init__ = __init__
        R.loss = loss


def zygote(args) -> int:
    from benchmarks import instructions as ins

    ins.prepare("lightning")
    toggle = ins.Toggle("client-request", args.shim)
    running = {}
    failed = 0
    for index, variant in enumerate(args.variants):
        while len(running) >= args.jobs:
            pid, status = os.wait()
            failed += status != 0
            running.pop(pid)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work = Path(args.workdir) / f"arm{index:02d}"
                work.mkdir(parents=True, exist_ok=True)
                os.chdir(work)
                patch(variant)
                import boundguard.integrations.torch.reducer as rmod

                res = ins.run_lightning("off" if variant == "off" else "default", args.warmup, args.steps,
                                        args.every, toggle)
                res.update(variant=variant, pid=os.getpid(), reducer=rmod.__file__)
                Path(args.results, f"{variant}.json").write_text(json.dumps(res))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        running[pid] = variant
    while running:
        pid, status = os.wait()
        failed += status != 0
        running.pop(pid)
    return 1 if failed else 0


ENTRY = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+\?*:?(.*?)\s+\[([^\]]*)\]\s*$")
ENTRY_POINTS = re.compile(r"(THPVariable_\w+|TypeError_to_NotImplemented_<&torch::autograd::THPVariable_\w+>|"
                          r"THPFunction_\w+|THPModule_\w+|"
                          r"^(array_\w+|ufunc_\w+|PyUFunc_GenericReduction|array_subscript|array_item|"
                          r"array_richcompare|arr_\w+|float_richcompare|builtin_\w+|method_vectorcall\w*|"
                          r"dispatcher_vectorcall|_PyArray_\w+|PyArray_\w+|gentype_\w+|float_\w+))")


def inclusive(cg_file: str) -> dict[str, int]:
    proc = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=yes", cg_file],
                          capture_output=True, text=True)
    out: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        m = ENTRY.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = m.group(2).split("(")[0].strip()
        name = re.sub(r"^torch::autograd::", "", name)
        if re.search(r"'\d+$", name) or not ENTRY_POINTS.search(name):  # recursion levels: the outer one has them
            continue
        key = f"{name} [{os.path.basename(m.group(3))}]"
        out[key] = out.get(key, 0) + int(m.group(1).replace(",", ""))
    return out


def diff(a: str, b: str, steps: int, top: int = 25) -> list[tuple[str, float]]:
    ia, ib = inclusive(a), inclusive(b)
    d = {k: (ia.get(k, 0) - ib.get(k, 0)) / steps for k in set(ia) | set(ib)}
    return sorted(d.items(), key=lambda kv: -abs(kv[1]))[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="inclusive entry-point costs per step, A - B")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shim", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.diff:
        print("| added Ir / step (inclusive) | entry point [object] |")
        print("| ---: | --- |")
        for name, v in diff(args.diff[0], args.diff[1], args.steps):
            print(f"| {v:+,.0f} | `{name}` |")
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if args.zygote:
        return zygote(args)
    if "default" not in args.variants:
        args.variants.insert(0, "default")
    from benchmarks import instructions as ins

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bg-ablation-"))
    shim = ins.build_shim(tmp)
    if shim is None or shutil.which("valgrind") is None:
        print("needs valgrind and a C compiler (client-request shim)", file=sys.stderr)
        return 2
    cg, results = tmp / "callgrind", tmp / "results"
    cg.mkdir()
    results.mkdir()
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={cg}/cg.%p.out",
           f"--log-file={cg}/valgrind.%p.log", sys.executable, str(HERE), "--zygote", "--variants",
           ",".join(args.variants), "--steps", str(args.steps), "--warmup", str(args.warmup), "--every",
           str(args.every), "--jobs", str(args.jobs), "--shim", str(shim), "--results", str(results),
           "--workdir", str(tmp / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ins.child_env("lightning"), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return 1
    per_step = {}
    for v in args.variants:
        res = json.loads((results / f"{v}.json").read_text())
        per_step[v] = ins.read_totals(cg / f"cg.{res['pid']}.out") / args.steps
        reducer_file = res["reducer"]
    d = per_step["default"]
    print(f"reducer module: {reducer_file}")
    print("| variant | what | instructions / step | vs default |")
    print("| --- | --- | ---: | ---: |")
    for v in args.variants:
        print(f"| {v} | {VARIANTS[v]} | {per_step[v]:,.0f} | {per_step[v] - d:+,.0f} |")
    if args.keep:
        print(f"callgrind files kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print("result: " + json.dumps({"ir_per_step": {v: round(x) for v, x in per_step.items()},
                                   "vs_default": {v: round(x - d) for v, x in per_step.items()},
                                   "reducer": reducer_file, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
