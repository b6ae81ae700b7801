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
    "empty": "a Callback that does nothing (what Lightning charges any callback)",
    "default": "BoundGuard() (check every 50 steps), unchanged",
    "no_batch": "on_train_batch_start records nothing (no targets, no inputs)",
    "no_loss": "on_before_backward records nothing (no loss; the batch-end fallback off too)",
    "no_grad": "TorchEngine.record_grads a no-op (no gradient-health reduction per step)",
    "fwd_noop": "the forward hook installed, returning at once (torch's hook path and the dynamo guard remain)",
    "fwd_none": "no forward hook installed (nothing of the prediction per step)",
    "no_eager": "the forward hook without torch._dynamo.disable around it",
    "no_trip": "no NaN tripwire look per step (the reducer never armed)",
}


def patch(variant: str) -> None:
    from boundguard.integrations.torch import engine, reducer as rmod
    from boundguard.integrations import _lightning

    E, R = engine.TorchEngine, rmod.Reducer
    if variant == "no_grad":
        E.record_grads = lambda self: None
    elif variant == "no_trip":  # never armed: a clean check's re-arming is ignored too
        R.trip_armed = property(lambda self: False, lambda self, value: None)
    elif variant == "no_batch":
        def start(self, trainer, pl_module, batch, batch_idx):
            self._engine.begin_step()
        _lightning.LightningGuard.on_train_batch_start = start
        orig_rb = E.record_batch
        E.record_batch = lambda self, batch=None, inputs=None, targets=None: (
            orig_rb(self, batch, inputs, targets) if self.reducer is None or self.step < 1 else None)
    elif variant == "no_loss":
        orig = E.record_loss
        E.record_loss = lambda self, loss: orig(self, loss) if self.reducer is None else None
    elif variant in ("fwd_noop", "fwd_none"):
        from boundguard.integrations.torch import hooks

        orig_install = E._install_hooks

        def install(self):
            orig_install(self)
            if self.reducer is None:
                return
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            if variant == "fwd_noop" and self._result is not None and self._result.pre_site is not None:
                m = dict(self.model.named_modules())[self._result.pre_site[0]]
                self._hooks.append(m.register_forward_hook(hooks._eager(lambda mod, a, o: None), prepend=True))
        E._install_hooks = install
    elif variant == "no_eager":
        from boundguard.integrations.torch import hooks

        hooks.StatsHook.__call__ = hooks._reduce_output


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

                arm = {"off": "off", "empty": "empty_callback"}.get(variant, "default")
                res = ins.run_lightning(arm, args.warmup, args.steps, args.every, toggle)
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
