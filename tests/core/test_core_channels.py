"""One channel per alert: a short warning line by default (its log record at DEBUG, so a root handler
at INFO does not print it twice), the ``boundguard`` logger's level filters it, and
``set_alert_channel("logging")`` moves it to logging."""
from __future__ import annotations

import logging
import warnings

import pytest

from boundguard import BoundGuardWarning
from boundguard.config import Config
from boundguard.session import Session
from boundguard.sinks import set_alert_channel
from boundguard.stats import COLUMNS, neutral_row


def out_of_range():
    """One step's row: predictions in [-0.5, 1.5], 5 of 10 outside (0, 1)."""
    col = {c: i for i, c in enumerate(COLUMNS)}
    row = neutral_row()
    row[col["pred.min"]], row[col["pred.max"]], row[col["pred.finite"]] = -0.5, 1.5, 10
    row[col["pred.below"]], row[col["pred.above"]] = 2, 3
    return row[None]


@pytest.fixture
def bg_logger():
    log = logging.getLogger("boundguard")
    level = log.level
    yield log
    log.setLevel(level)
    set_alert_channel("warnings")


def _run(**options):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = Session(Config(bounds=(0, 1), **options), write=False)
        s.count_steps()
        s.check(out_of_range(), {"pred": 10}, [False])
    return [w for w in seen if issubclass(w.category, BoundGuardWarning)]


def test_default_is_one_short_warning_and_a_debug_record(caplog, bg_logger):
    caplog.set_level(logging.DEBUG, logger="boundguard")
    ws = _run(on_violation="warn")
    assert [str(w.message).split(" at step")[0] for w in ws] == ["[error] output_out_of_range"]
    for w in ws:
        text = str(w.message)
        assert "\n" not in text and len(text) < 300 and "boundguard explain" in text
    records = [r for r in caplog.records if r.name == "boundguard" and "output_out_of_range" in r.getMessage()]
    assert records and all(r.levelno == logging.DEBUG for r in records), "an INFO root handler would double it"


def test_the_logger_level_silences_the_warnings(bg_logger):
    bg_logger.setLevel(logging.CRITICAL)
    assert _run(on_violation="warn") == []
    bg_logger.setLevel(logging.ERROR)
    assert [str(w.message).split(" ")[1] for w in _run(on_violation="warn")] == ["output_out_of_range"]


def test_logging_channel_logs_at_the_alert_level_and_does_not_warn(caplog, bg_logger):
    caplog.set_level(logging.INFO, logger="boundguard")
    set_alert_channel("logging")
    assert _run(on_violation="warn") == []
    levels = {r.getMessage().split(" ")[1]: r.levelno for r in caplog.records
              if r.name == "boundguard" and r.getMessage().startswith("[")}  # (not the first check's description)
    assert levels == {"output_out_of_range": logging.ERROR}
    with pytest.raises(ValueError, match="channel"):
        set_alert_channel("print")


def test_end_of_run_table_is_printed_once_when_the_run_raised_warnings(tmp_path, capsys):
    s = Session(Config(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / "alerts.jsonl"))
    s.open()
    s.count_steps()
    s.check(out_of_range(), {"pred": 10}, [False])
    s.finish()
    s.finish()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "boundguard: 1 alert (1 error)"
    assert err[1].split()[:4] == ["error", "output_out_of_range", "step", "1"]
    assert f"boundguard report {tmp_path / 'alerts.jsonl'}" in err[2] and len(err) == 3
    quiet = Session(Config(bounds=(0, 1), on_violation="log"), write=False)
    quiet.finish()
    assert capsys.readouterr().err == ""
