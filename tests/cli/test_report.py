"""`boundguard report` on files written by real Lightning runs."""
from __future__ import annotations

import json

import pytest

from boundguard.alerts import SEVERITIES, severity_rank


def expected_groups(recs: list[dict]) -> dict[str, dict]:
    """What the report must say per code, computed independently from the raw records."""
    out: dict[str, dict] = {}
    for r in recs:
        g = out.setdefault(r["code"], {"counts": {}, "first": r["step"], "last": r["last_step"], "sev": r["severity"]})
        g["counts"][r["where"]] = max(g["counts"].get(r["where"], 0), r["count"])
        g["first"] = min(g["first"], r["step"])
        g["last"] = max(g["last"], r["last_step"])
        if severity_rank(r["severity"]) > severity_rank(g["sev"]):
            g["sev"] = r["severity"]
    return {c: {"count": sum(g["counts"].values()), "first_step": g["first"], "last_step": g["last"],
                "severity": g["sev"]} for c, g in out.items()}


def test_runs_wrote_both_files(runs, records):
    recs = records(runs.faulty)
    assert {r["type"] for r in recs} == {"alert"}
    assert "output_out_of_range" in {r["code"] for r in recs}
    assert any(r["event"] == "summary" for r in recs)  # counts that grew after the first record
    stats = records(runs.faulty.with_name("stats.jsonl"))
    assert stats[0]["type"] == "run" and len([s for s in stats if s["type"] == "stats"]) == 7
    assert not (runs.healthy / "alerts.jsonl").exists() and (runs.healthy / "stats.jsonl").exists()
    assert runs.lstm.with_name("lstm.stats.jsonl").exists()


def test_report_text(runs, cli, records):
    res = cli("report", runs.faulty)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stderr == ""
    out = res.stdout
    assert "\x1b[" not in out  # plain when piped
    assert str(runs.faulty) in out and "7 checks, steps 1-60, bounds [0, 1]" in out
    for code, g in expected_groups(records(runs.faulty)).items():
        row = next(line for line in out.splitlines() if f" {code} " in line)
        steps = f"{g['first_step']}-{g['last_step']}" if g["first_step"] != g["last_step"] else str(g["first_step"])
        assert row.split()[:4] == [g["severity"], code, str(g["count"]), steps]
    assert "message: " in out and "fix:     Put a bounding activation" in out
    assert "(threshold 0)" in out
    assert out.rstrip().endswith("Details of a code: boundguard explain CODE")


def test_report_healthy_says_no_alerts(runs, cli):
    res = cli("report", runs.healthy)
    assert res.returncode == 0, res.stderr
    assert "No alerts" in res.stdout and "7 checks" in res.stdout
    assert "1 run, 0 with alerts." in res.stdout
    # the alerts file a healthy run never wrote is not "missing": its statistics log is there
    res = cli("report", runs.healthy / "alerts.jsonl", "--fail-on", "info")
    assert res.returncode == 0 and "No alerts" in res.stdout


def test_report_markdown(runs, cli):
    res = cli("report", runs.faulty, runs.healthy, "--format", "markdown")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "# boundguard report"
    header = "| severity | code | count | steps | worst (threshold) | where | message | fix |"
    assert lines.count(header) == 1
    rows = [line for line in lines if line.startswith("| error |")]
    assert any("`output_out_of_range`" in r for r in rows)
    assert all(r.count(" | ") == 7 for r in rows)  # no stray pipes from messages
    assert f"## `{runs.healthy / 'stats.jsonl'}`" in lines and "No alerts." in lines


def test_report_json(runs, cli, records):
    res = cli("report", runs.faulty, "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == 1 and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert run["checks"] == 7 and run["last_step"] == 60 and run["bounds"]["hi"] == 1.0
    got = {a["code"]: a for a in run["alerts"]}
    want = expected_groups(records(runs.faulty))
    assert got.keys() == want.keys()
    for code, w in want.items():
        assert {k: got[code][k] for k in w} == w
        assert got[code]["fix"] and got[code]["message"] and got[code]["where"]
    oor = got["output_out_of_range"]
    values = [r["value"] for r in records(runs.faulty) if r["code"] == "output_out_of_range"]
    assert oor["value"] == max(values) and oor["threshold"] == 0.0
    assert doc["severity"] == max((a["severity"] for a in run["alerts"]), key=SEVERITIES.index)


@pytest.mark.parametrize("level, code", [("info", 1), ("warning", 1), ("error", 1), ("critical", 0)])
def test_fail_on(runs, cli, level, code):
    res = cli("report", runs.faulty, "--fail-on", level, "--format", "json")
    assert res.returncode == code, res.stderr
    json.loads(res.stdout)  # the report is printed either way
    assert ("alerts at or above" in res.stderr) == (code == 1)


def test_fail_on_healthy_run_passes(runs, cli):
    assert cli("report", runs.healthy, "--fail-on", "info").returncode == 0


def test_fail_on_rejects_unknown_severity(runs, cli):
    res = cli("report", runs.faulty, "--fail-on", "fatal")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_several_paths_and_directory_discovery(runs, cli):
    res = cli("report", runs.faulty, runs.healthy, runs.lstm, "--format", "json")
    assert res.returncode == 0, res.stderr
    names = [r["run"] for r in json.loads(res.stdout)["runs"]]
    assert names == [str(runs.faulty), str(runs.healthy / "stats.jsonl"), str(runs.lstm)]
    # the whole tree: alerts*.jsonl plus any run found through its statistics log (lstm.jsonl)
    res = cli("report", runs.root, "--format", "json")
    doc = json.loads(res.stdout)
    assert sorted(r["run"] for r in doc["runs"]) == sorted(names)
    lstm = next(r for r in doc["runs"] if r["run"] == str(runs.lstm))
    assert lstm["stats_path"] == str(runs.lstm.with_name("lstm.stats.jsonl"))
    assert "output_out_of_range" in {a["code"] for a in lstm["alerts"]}
    # the same file twice is reported once
    res = cli("report", runs.faulty, runs.faulty.parent, "--format", "json")
    assert len(json.loads(res.stdout)["runs"]) == 1


def test_text_report_of_several_runs(runs, cli):
    res = cli("report", runs.root)
    assert res.returncode == 0
    assert "3 runs, 2 with alerts; highest severity: error." in res.stdout


def test_python_m_boundguard(runs, cli):
    res = cli("report", runs.faulty, "--fail-on", "error", module=True)
    assert res.returncode == 1 and "output_out_of_range" in res.stdout
    res = cli("--version", module=True)
    assert res.returncode == 0 and res.stdout.startswith("boundguard ")


def test_rich_table_when_forced(runs, cli):
    res = cli("report", runs.faulty, runs.healthy, "--color", "always")
    assert res.returncode == 0, res.stderr
    assert "output_out_of_range" in res.stdout and "No alerts" in res.stdout


def test_no_command_prints_help(cli):
    res = cli()
    assert res.returncode == 2 and "report" in res.stderr and "explain" in res.stderr
