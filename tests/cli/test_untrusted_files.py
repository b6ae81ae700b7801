"""Files are untrusted data: damaged content is skipped with a one-line warning, never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest


def copy_run(runs, tmp_path, name="run"):
    d = tmp_path / name
    shutil.copytree(runs.faulty.parent, d)
    return d / "alerts.jsonl"


def assert_clean_failure(res, code=2):
    assert res.returncode == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout


def test_truncated_last_line(runs, cli, tmp_path):
    alerts = copy_run(runs, tmp_path)
    data = alerts.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    alerts.write_bytes(data[: last + (len(data) - last) // 2])  # killed mid-write: half a line, no newline
    res = cli("report", alerts, "--format", "json")
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stderr.splitlines() if line]
    assert len(warning) == 1 and "skipped 1 unreadable line" in warning[0] and "truncated" in warning[0]
    codes = {a["code"] for a in json.loads(res.stdout)["runs"][0]["alerts"]}
    assert "output_out_of_range" in codes
    # the statistics log cut the same way still plots
    stats = alerts.with_name("stats.jsonl")
    s = stats.read_bytes()
    stats.write_bytes(s[: len(s) - 40])
    res = cli("plot", alerts, "-o", tmp_path / "cut.png")
    assert res.returncode == 0, res.stderr
    assert "truncated" in res.stderr and (tmp_path / "cut.png").stat().st_size > 10_000


def test_damaged_lines_are_skipped_and_counted(runs, cli, tmp_path, records):
    alerts = copy_run(runs, tmp_path)
    good = alerts.read_text()
    newer = dict(records(alerts)[0], schema=99, code="from_the_future")
    bad_types = dict(records(alerts)[0], step="ten")
    junk = [
        "{not json",
        json.dumps(newer),
        json.dumps(bad_types),
        "[1, 2, 3]",
        json.dumps({"type": "alert", "code": "x"}),  # no schema: not a boundguard record
        '{"schema": 1, "type": "alert", "code": "x", "severity": "catastrophic", "step": 1}',
        "x" * (2 << 20),  # a 2 MiB line
    ]
    alerts.write_bytes(junk[0].encode() + b"\n" + good.encode() + "\n".join(junk[1:]).encode() + b"\n"
                       + b"\xff\xfe\x00 binary\n" + b"\n")
    res = cli("report", alerts)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line]
    assert len(lines) == 1, lines
    n_lines = len(good.splitlines()) + 9
    assert f"skipped 8 unreadable lines of {n_lines} (line 1: not valid JSON; line " in lines[0]
    assert "and 5 more" in lines[0]
    assert "output_out_of_range" in res.stdout and "from_the_future" not in res.stdout
    assert "Traceback" not in res.stderr


def test_only_newer_schema(runs, cli, tmp_path, records):
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_text("\n".join(json.dumps(dict(r, schema=2)) for r in records(runs.faulty)) + "\n")
    res = cli("report", alerts)
    assert_clean_failure(res)
    assert "newer than this boundguard reads" in res.stderr and "upgrade boundguard" in res.stderr


def test_not_an_alerts_file(cli, tmp_path):
    f = tmp_path / "alerts.jsonl"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10)
    res = cli("report", f)
    assert_clean_failure(res)
    assert "no readable alert record" in res.stderr


def test_empty_alerts_file_has_no_alerts(cli, tmp_path):
    f = tmp_path / "alerts.jsonl"
    f.write_text("")
    res = cli("report", f, "--fail-on", "info")
    assert res.returncode == 0 and "No alerts." in res.stdout


@pytest.mark.parametrize("command", ["report", "plot"])
def test_missing_file(cli, tmp_path, command):
    res = cli(command, tmp_path / "nope" / "alerts.jsonl")
    assert_clean_failure(res)
    assert res.stderr.startswith("boundguard: error: no such file or directory:")
    assert str(tmp_path / "nope" / "alerts.jsonl") in res.stderr
    assert res.stdout == ""


def test_one_missing_among_several(runs, cli, tmp_path):
    res = cli("report", runs.faulty, tmp_path / "gone.jsonl")
    assert_clean_failure(res)
    assert "gone.jsonl" in res.stderr and res.stdout == ""


def test_directory_without_boundguard_files(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    res = cli("report", tmp_path)
    assert_clean_failure(res)
    assert "no boundguard files found" in res.stderr


def test_unreadable_file(runs, cli, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    alerts = copy_run(runs, tmp_path)
    alerts.chmod(0)
    res = cli("report", alerts)
    assert_clean_failure(res)
    assert "cannot read" in res.stderr
