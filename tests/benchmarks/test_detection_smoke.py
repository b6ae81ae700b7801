"""CI keeps the detection benchmark runnable: its smoke configuration (seconds) exits 0 and prints the summary."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("lightning")
pytest.importorskip("keras")
pytest.importorskip("tensorflow")


def test_detection_smoke_runs_and_summarises(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)  # the script runs its Keras half in a child process on tensorflow
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.detection", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert "summary" in out, out[-4000:]
    for tool in ("EarlyStopping", "detect_anomaly", "TerminateOnNaN"):
        assert tool in out, out[-4000:]
    # the seed's bug is caught in both frameworks, and the healthy twins stay quiet
    for fw in ("lightning", "keras"):
        assert re.search(fw + r"\s+boundguard\s+recall 1/1, in-interval 1/1, false alarms 0/1", out), out[-4000:]
    assert not list(tmp_path.iterdir())  # smoke runs write no results
