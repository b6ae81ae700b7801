"""CI runs a seconds-long configuration of the overhead benchmark so the script cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--smoke", "--no-keras", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line for line in out.stdout.splitlines() if ":" in line}
    syncs = json.loads(lines["syncs"].split(":", 1)[1])
    assert syncs["host_reads_between_checks"] == 0
    assert syncs["device_to_host_copies_between_checks"] == 0
    assert syncs["device_to_host_copies_per_check"] == 1.0
    assert any(line.startswith("lightning | seed LSTM") for line in out.stdout.splitlines())
    assert not list(tmp_path.iterdir()), "--smoke must not write results"
