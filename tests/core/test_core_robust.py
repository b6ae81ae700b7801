"""Files that cannot be written never fail training, a torn last line is not glued to the next record,
thresholds are validated with the option and key named, and statistics survive huge magnitudes."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from boundguard import BoundGuardWarning
from boundguard.config import Config
from boundguard.sinks import JsonLinesWriter
from boundguard.stats import COLUMNS, Snapshot, neutral_row


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"schema": 1, "type": "alert"}\n{"schema": 1, "ty')  # a killed run's torn last line
    w = JsonLinesWriter(path)
    w.write({"type": "alert", "code": "x"})
    w.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"schema": 1, "ty' and json.loads(lines[2]) == {"type": "alert", "code": "x", "schema": 1}


def test_an_unwritable_path_warns_once_and_keeps_going(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    w = JsonLinesWriter(blocker / "alerts.jsonl")
    with pytest.warns(BoundGuardWarning, match="kept in memory") as record:
        w.write({"a": 1})
        w.write({"a": 2})
        w.close()
    assert len(record) == 1 and w.failed


FULL_DISK = textwrap.dedent('''
    import resource, signal, sys, warnings, torch
    from torch import nn
    from boundguard.integrations.torch import watch
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # a disk that fills after ~3 KB per file
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with watch(model, bounds=(0, 1), check_every_n_steps=1, alerts_path=sys.argv[1]) as guard:
            for step in range(60):
                x, y = torch.randn(8, 4), torch.rand(8, 1)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward(); opt.step(); opt.zero_grad()
                guard.step(loss=loss, inputs=x, targets=y)
    full = [w for w in seen if "kept in memory" in str(w.message)]
    print(len(full), len(guard.alerts), guard.engine.step, guard.engine.disabled)
''')


def test_a_full_disk_never_fails_training(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run" / "alerts.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    warned, n_alerts, steps, disabled = out.stdout.split()
    assert int(warned) == 1, "one warning for the stats file that filled up"
    assert int(n_alerts) >= 2 and int(steps) == 60 and disabled == "False"


def test_alerts_path_with_nul_is_rejected_at_construction():
    with pytest.raises(ValueError, match="alerts_path.*NUL"):
        Config(alerts_path="run/\x00alerts.jsonl")


@pytest.mark.parametrize("thresholds,words", [
    ({"loss_spike": {"factor": -2}}, ["thresholds['loss_spike']['factor']", ">= 1", "-2"]),
    ({"output_saturated": {"pinned_share": 1.5}}, ["thresholds['output_saturated']['pinned_share']", "[0, 1]"]),
    ({"inputs_not_scaled": {"rms_high": 0}}, ["thresholds['inputs_not_scaled']['rms_high']", "positive"]),
    ({"loss_plateau": {"patience": 0}}, ["thresholds['loss_plateau']['patience']", ">= 1"]),
    ({"loss_plateau": {"patience": 2.5}}, ["patience", "whole number"]),
    ({"preactivation_exploding": {"absmax": math.inf}}, ["absmax", "finite"]),
])
def test_nonsense_thresholds_are_rejected_naming_option_and_key(thresholds, words):
    with pytest.raises(ValueError) as info:
        Config(thresholds=thresholds)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_scalar_thresholds_are_accepted():
    cfg = Config(thresholds={"loss_spike": {"factor": np.float32(6.0), "min_history": np.int64(20)}})
    assert cfg.thresholds["loss_spike"]["factor"] == 6.0


def test_rms_of_huge_inputs_is_not_lost_to_overflow():
    """Raw timestamps (~1e18): the fp32 sum of squares overflows; the rms is still far above 1."""
    col = {c: i for i, c in enumerate(COLUMNS)}
    row = neutral_row()
    row[col["input.min"]], row[col["input.max"]], row[col["input.finite"]] = 1.6e18, 1.7e18, 64
    row[col["input.sumsq"]] = math.inf  # what an fp32 dot of such values gives
    snap = Snapshot.from_rows(row[None], {"input": 64}, step=1, first_step=1)
    assert snap.rms("input") >= 1.7e18 / 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from boundguard.session import Session
        s = Session(Config(on_violation="log"), write=False)
        s.count_steps()
        codes = {d.alert.code for d in s.check(row[None], {"input": 64}, [False])}
    assert "inputs_not_scaled" in codes


def test_the_statistics_log_gives_the_snapshots_rms(tmp_path):
    """The plot's RMS (StatsLog.rms, read back from the log) is the Snapshot's, overflow fallback included."""
    from boundguard.report import read_stats

    col = {c: i for i, c in enumerate(COLUMNS)}
    snaps = []
    for step, (lo, hi, sumsq, finite) in enumerate([(1.6e18, 1.7e18, math.inf, 64), (-2.0, 2.0, 64.0, 16),
                                                    (0.0, 0.0, 0.0, 0)], 1):
        row = neutral_row()
        row[col["input.min"]], row[col["input.max"]], row[col["input.sumsq"]] = lo, hi, sumsq
        row[col["input.finite"]] = finite
        snaps.append(Snapshot.from_rows(row[None], {"input": 64}, step=step, first_step=step))
    w = JsonLinesWriter(tmp_path / "stats.jsonl")
    for snap in snaps:
        w.write({"type": "stats", **snap.to_record()})
    w.close()
    logged = read_stats(tmp_path / "stats.jsonl").rms("input")
    expected = [snap.rms("input") for snap in snaps]
    assert logged[0] == expected[0] == pytest.approx(1.7e18 / 8) and logged[1] == expected[1] == 2.0
    assert math.isnan(logged[2]) and math.isnan(expected[2])


def test_alerts_to_dev_null_writes_no_stats_file_beside_it(tmp_path):
    """``alerts_path="/dev/null"``: both logs go to the device; no ``/dev/null.stats.jsonl`` appears."""
    import os

    from boundguard.sinks import alerts_path_for, stats_path_for

    assert stats_path_for(Path(os.devnull)) == Path(os.devnull)
    assert stats_path_for(tmp_path / "alerts.jsonl") == tmp_path / "stats.jsonl"
    assert stats_path_for(tmp_path / "run.jsonl") == tmp_path / "run.stats.jsonl"
    assert stats_path_for(tmp_path / "run") == tmp_path / "run.stats.jsonl"  # no .jsonl: the whole name is the stem
    for alerts in ("alerts.jsonl", "run.jsonl"):
        assert alerts_path_for(stats_path_for(tmp_path / alerts)) == tmp_path / alerts
