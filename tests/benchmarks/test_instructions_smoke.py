"""CI runs the instruction-count benchmark's smoke configuration: a real callgrind measurement of the seed
LSTM on Lightning without the callback (twice: the self-check) and with ``BoundGuard(check_every_n_steps=10)``
over one 10-step check interval. About a minute on a quiet 2-core machine (most of it is importing torch and
Lightning on valgrind's simulated CPU)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("lightning")

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not on PATH (apt-get install valgrind)")


def test_instructions_smoke():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.instructions", "--smoke"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("result: ")]
    assert lines, out[-4000:]
    result = json.loads(lines[-1][len("result: "):])
    # two processes without the callback count the same instructions per step, to 3 decimals
    assert f"{result['self_check']['lightning']:.3f}" == "1.000", out[-4000:]
    assert "self-check lightning: off_b / off" in out and " ok" in out
    # the callback's work is measured, not assumed: more instructions per step with it than without
    assert result["ratio"]["default"] > 1.0, out[-4000:]
    assert result["ir_per_step"]["default"] > result["ir_per_step"]["off"] > 0
