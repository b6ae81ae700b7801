"""The size-scaling benchmark of the torch Reducer cannot rot: its core at tiny sizes, in-process, and the
command's ``--smoke`` configuration with its worker run in-process. No timing assertions: only that the table is
produced and every number in it is finite."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from benchmarks import scaling  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _finite(cells: list[dict], keys: tuple[str, ...]) -> None:
    for c in cells:
        for k in keys:
            assert isinstance(c[k], float) and math.isfinite(c[k]) and c[k] > 0, (k, c)


def test_scaling_core_tiny_sizes():
    res = scaling.worker_wall([64, 5_000], list(scaling.CASES), interval=3, target_s=0.0)
    cells = res["cells"]
    assert {(c["case"], c["n"]) for c in cells} == {(c, n) for c in scaling.CASES for n in (64, 5_000)}
    _finite(cells, ("reducer_ms", "aminmax_ms", "ratio"))
    assert not any(c["tripped"] for c in cells)  # finite values never trip the NaN tripwire
    assert res["who"]["reducer"].startswith(str(ROOT))
    summary = scaling.summarize([cells, cells])
    _finite(summary, ("reducer_ms", "reducer_ms_min", "reducer_ms_max", "aminmax_ms", "ratio"))
    text = scaling.table(summary, summary)
    lines = text.splitlines()
    assert lines[0].startswith("| case | elements | reducer ms / step")
    assert len(lines) == 2 + len(cells)
    assert "| straddle | 5,000 |" in text and "nan" not in text.lower() and "inf" not in text.lower()


def test_scaling_smoke_main(tmp_path, monkeypatch, capsys):
    """``main --smoke`` end to end, its worker processes replaced by in-process calls (a worker process
    would import torch again: seconds)."""

    def spawn(wargs, baseline, timeout, prefix=None):
        assert baseline is None and prefix is None
        a = dict(zip(wargs[::2], wargs[1::2]))
        return scaling.worker_wall([int(n) for n in a["--sizes"].split(",")], a["--cases"].split(","),
                                   int(a["--interval"]), float(a["--target"]))

    monkeypatch.setattr(scaling, "spawn", spawn)
    assert scaling.main(["--smoke", "--sizes", "100,5000", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| case | elements | reducer ms / step" in out
    result = json.loads([line for line in out.splitlines() if line.startswith("result: ")][-1][len("result: "):])
    ratios = result["ratio"]["new"]
    assert set(ratios) == {f"{c}/{n}" for c in scaling.CASES for n in (100, 5000)}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    written = list(tmp_path.glob("scaling-*.md"))
    assert len(written) == 1 and "| inside | 1e2 |" in written[0].read_text()
