"""CI runs a seconds-long configuration of the language-model benchmark so the script cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_llm_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.llm", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.splitlines()[-1].removeprefix("result: "))
    assert [(r["loop"], r["shape"], r["dtype"], r["seq"]) for r in rows] == [("plain", "gpt2", "bf16", 16),
                                                                             ("hf", "gpt2", "bf16", 16)]
    for r in rows:
        assert r["peak_off_mb"] > 100 and r["peak_on_mb"] > 100 and r["codes"] == []
        assert r["extra_mb"] == r["peak_on_mb"] - r["peak_off_mb"]
    assert not list(tmp_path.iterdir()), "--smoke must not write results"
