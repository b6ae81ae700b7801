"""`boundguard report --format html`: one self-contained page with the facts, the alerts and the plots."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from boundguard.html import render_html
from boundguard.report import find_runs, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
HOSTILE = '<script>alert("pwned")</script> & <b>bold</b>'


def page_for(*paths: Path, **kw) -> str:
    return render_html([load_run(f) for f in find_runs(list(paths))], **kw)


def has_code(page: str, code: str) -> bool:
    """The alert table shows ``code`` (breakable after its underscores)."""
    return f"<code>{code.replace('_', '_<wbr>')}</code>" in page


def pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in DATA_PNG.findall(page)]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_self_contained(page: str) -> None:
    """No reference that would reach the network (or any other file): the page stands alone."""
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", page, re.I)
    parser = _Tags()
    parser.feed(page)
    tags = {t for t, _ in parser.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base", "form", "frame", "svg"}
    for tag, attrs in parser.tags:
        assert not {a for a in attrs if a.startswith("on")}, (tag, attrs)
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if name in attrs:
                assert attrs[name].startswith(("data:image/png;base64,", "#")), (tag, name, attrs[name][:80])
    assert not re.search(r"@import|url\(", page, re.I)
    assert page.isascii()


def alert(code: str, severity: str, step: int, **kw) -> dict:
    rec = {"schema": 1, "type": "alert", "event": "new", "code": code, "severity": severity, "step": step,
           "last_step": step, "count": 1, "where": "head", "message": f"{code} at step {step}", "fix": "a fix"}
    return {**rec, **kw}


def stats(step: int, **kw) -> dict:
    rec = {"schema": 1, "type": "stats", "step": step, "pred.n": 10, "pred.min": -2.0 + step / 100, "pred.max": 3.0,
           "pred.below": 2, "pred.above": 3, "pre.min": -2.0, "pre.max": 3.0, "pre.sumsq": 40.0, "pre.finite": 10,
           "loss.mean": 1.0 / step, "loss.min": 0.5 / step, "loss.max": 2.0 / step,
           "bounds": {"lo": 0.0, "hi": 1.0, "kind": "interval", "inferred": True}}
    return {**rec, **kw}


def run_record(facts: dict) -> dict:
    return {"schema": 1, "type": "run", "facts": facts, "bounds": None,
            "config": {"bounds": "auto", "on_violation": "warn", "actions": None, "check_every_n_steps": 10}}


def write_run(d: Path, alerts: list[dict], stats_recs: list[dict] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "alerts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alerts))
    if stats_recs is not None:
        (d / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats_recs))
    return d / "alerts.jsonl"


FACTS = {"pred_where": "fc_out", "pre_where": "fc_out", "activation": "identity", "activation_params": {},
         "loss": {"name": "mse_loss", "family": "regression", "multiclass": False, "link": None},
         "loss_where": "mse_loss", "target_where": "batch[1]", "input_where": "batch[0]", "target_integer": False,
         "input_integer": False, "classes": 1, "pre_dtype": "float32", "notes": []}


# ---------------------------------------------------------------------------------------- a real run
def test_html_faulty_run(runs, records):
    page = page_for(runs.faulty)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert_self_contained(page)
    for code in {r["code"] for r in records(runs.faulty)}:
        assert has_code(page, code)
    facts = records(runs.faulty.with_name("stats.jsonl"))[0]["facts"]
    for key in ("pred_where", "pre_where", "activation", "loss_where", "target_where", "input_where"):
        assert f"<code>{facts[key]}</code>" in page, key
    for label in ("prediction", "pre-activation", "activation", "loss", "targets", "inputs", "bounds in force"):
        assert f"<th>{label}</th>" in page
    assert "[0, 1]" in page and 'class="badge ' in page
    (png,) = pngs(page)
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == (900, 1100)


def test_html_several_runs(runs):
    page = page_for(runs.root)
    assert_self_contained(page)
    names = [str(runs.faulty), str(runs.healthy / "stats.jsonl"), str(runs.lstm)]
    for i, name in enumerate(names, 1):
        assert f'id="run-{i}"' in page and f'href="#run-{i}"' in page and name in page
    assert page.count('<section class="run ') == 3
    assert "No alerts: no check found a problem." in page  # the healthy run
    assert len(pngs(page)) == 3 and all(p.startswith(PNG_MAGIC) for p in pngs(page))


def test_html_run_without_stats(runs, tmp_path):
    alerts = tmp_path / "copy" / "alerts.jsonl"
    alerts.parent.mkdir()
    alerts.write_bytes(runs.faulty.read_bytes())
    page = page_for(alerts)
    assert_self_contained(page)
    assert "Not known: no statistics log beside the alerts file." in page
    assert "No plot: no statistics log beside the alerts file." in page
    assert "(no statistics log)" in page and not pngs(page)
    assert has_code(page, "output_out_of_range")


def test_html_without_matplotlib(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    page = page_for(runs.faulty)
    assert "Plots need matplotlib" in page and "pip install &#x27;boundguard[plot]&#x27;" in page
    assert not pngs(page) and has_code(page, "output_out_of_range")


# ---------------------------------------------------------------------------------------- hand-written files
def test_html_escapes_untrusted_text(tmp_path):
    d = tmp_path / "<b>run</b>"
    alerts = write_run(d, [alert("output_out_of_range", "error", 3, message=HOSTILE, where='"><img src=x onerror=1>',
                                 fix="<style>body{display:none}</style>")],
                       [run_record({**FACTS, "pred_where": "<script>x()</script>", "loss": {"name": "<i>l</i>"}}),
                        stats(3)])
    page = page_for(alerts, plots=False)
    assert_self_contained(page)
    assert "<b>bold" not in page and "<b>run" not in page and "<img" not in page and "<i>" not in page
    assert page.count("<style>") == 1 and "<script" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=1&gt;" in page
    assert "&lt;script&gt;x()&lt;/script&gt;" in page and "&lt;b&gt;run&lt;/b&gt;" in page


def test_html_non_ascii_and_odd_values(tmp_path):
    alerts = write_run(tmp_path / "r", [alert("nonfinite_loss", "critical", 2, message="\u00e9t\u00e9 \u2192 \ud800",
                                              value="nan", threshold=0)],
                       [run_record({"activation": 3, "loss": "odd", "notes": [["targets", "targets_fn=..."]]}),
                        stats(2, bounds="garbage")])
    page = page_for(alerts, plots=False)
    assert page.isascii() and "&#233;t&#233; &#8594;" in page and "worst nan (threshold 0)" in page
    assert "targets - targets_fn=..." in page


def test_html_missing_facts_say_not_found(tmp_path):
    alerts = write_run(tmp_path / "r", [alert("missing_output_activation", "warning", 1)],
                       [run_record({"activation": "unknown"}), stats(1), stats(11)])
    page = page_for(alerts, plots=False)
    for label in ("prediction", "pre-activation", "loss", "targets", "inputs"):
        row = re.search(rf"<th>{label}</th><td>(.*?)</td></tr>", page)
        assert row and "not found" in row.group(1), label
    assert "(not recognised)" in page
    assert "[0, 1] (inferred from the targets and loss)" in page and "configured: <code>auto</code>" in page
    assert "2 checks, steps 1-11" in page


def test_html_marks_escalation(tmp_path):
    alerts = write_run(tmp_path / "r", [alert("inputs_not_scaled", "warning", 1),
                                        alert("inputs_not_scaled", "error", 40, event="escalated", count=5),
                                        alert("nonfinite_loss", "critical", 20)],
                       [run_record(FACTS)] + [stats(s) for s in (1, 10, 20, 30, 40)])
    page = page_for(alerts)
    rows = re.findall(r'<tr class="sev-(\w+)">(.*?)</tr>', page, re.S)
    assert [sev for sev, _ in rows] == ["critical", "error"]
    assert "escalated: warning (step 1) &rarr; error (step 40)" in rows[1][1] and "escalated" not in rows[0][1]
    assert "1&ndash;40" in rows[1][1]
    assert len(pngs(page)) == 1


def test_html_unreadable_alerts_file(tmp_path):
    (tmp_path / "alerts.jsonl").write_text("not json\n")
    page = page_for(tmp_path / "alerts.jsonl", plots=False)
    assert "Unreadable:" in page and "Skipped:" in page


def test_importing_the_html_module_stays_light():
    code = ("import sys, json, boundguard, boundguard.html; "
            "print(json.dumps([m for m in ('matplotlib', 'torch', 'rich') if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


# ---------------------------------------------------------------------------------------- the command
def test_cli_html_to_file_and_fail_on(runs, cli, tmp_path):
    out = tmp_path / "report.html"
    res = cli("report", runs.faulty, "--format", "html", "-o", out, module=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {out} (1 run, html)\n"
    page = out.read_text(encoding="ascii")
    assert_self_contained(page)
    assert has_code(page, "output_out_of_range") and pngs(page)
    out.unlink()
    res = cli("report", runs.faulty, "--format", "html", "-o", out, "--fail-on", "warning", module=True)
    assert res.returncode == 1 and "alerts at or above 'warning' found" in res.stderr
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert cli("report", runs.healthy, "--format", "html", "-o", out, "--fail-on", "warning").returncode == 0


def test_cli_html_to_stdout(runs, cli):
    res = cli("report", runs.lstm, "--format", "html")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("<!DOCTYPE html>") and str(runs.lstm) in res.stdout
    assert_self_contained(res.stdout)


def test_cli_output_option_for_other_formats(runs, cli, tmp_path):
    out = tmp_path / "report.md"
    assert cli("report", runs.faulty, "--format", "markdown", "-o", out).returncode == 0
    assert out.read_text() == cli("report", runs.faulty, "--format", "markdown").stdout
    res = cli("report", runs.faulty, "--format", "html", "-o", tmp_path / "missing" / "r.html")
    assert res.returncode == 2 and "cannot write" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_cli_other_formats_unchanged(runs, cli, fmt):
    """The text, Markdown and JSON output are what the renderers give, with no -o."""
    from boundguard import cli as c

    res = cli("report", runs.root, "--format", fmt, "--color", "never")
    loaded = [load_run(f) for f in find_runs([runs.root])]
    assert res.stdout == {"text": c.render_text, "markdown": c.render_markdown, "json": c.render_json}[fmt](loaded)
