"""`boundguard plot` and `boundguard explain`."""
from __future__ import annotations

import json

import pytest

from boundguard.catalogue import CATALOGUE, CODES


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_plot_faulty_run(runs, cli, tmp_path):
    out = tmp_path / "run.png"
    res = cli("plot", runs.faulty, "-o", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {out} (1100x900 pixels)"
    img = read_png(out)
    assert img.shape[:2] == (900, 1100)
    rgb = img[..., :3]
    assert rgb.var() > 0.01  # not blank
    # alert lines and the out-of-bounds share are drawn in red
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)
    assert red.sum() > 500


def test_plot_size_and_healthy_run(runs, cli, tmp_path):
    out = tmp_path / "healthy.png"
    res = cli("plot", runs.healthy, "-o", out, "--size", "800x600", "--title", "healthy run")
    assert res.returncode == 0, res.stderr
    img = read_png(out)
    assert img.shape[:2] == (600, 800) and img[..., :3].var() > 0.01


def test_plot_refuses_ambiguous_directory(runs, cli, tmp_path):
    res = cli("plot", runs.root, "-o", tmp_path / "x.png")
    assert res.returncode == 2 and "holds 3 runs" in res.stderr and str(runs.lstm) in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_needs_a_statistics_log(runs, cli, tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_bytes(runs.faulty.read_bytes())
    res = cli("plot", alerts, "-o", tmp_path / "x.png")
    assert res.returncode == 2 and "no statistics log" in res.stderr and "stats.jsonl" in res.stderr


def test_plot_bad_size(runs, cli, tmp_path):
    res = cli("plot", runs.faulty, "--size", "big")
    assert res.returncode == 2 and "WIDTHxHEIGHT" in res.stderr


def test_plot_without_matplotlib(runs, cli, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "matplotlib.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    res = cli("plot", runs.faulty, "-o", tmp_path / "x.png", env={"PYTHONPATH": str(shim)})
    assert res.returncode == 2, res.stderr
    assert "pip install 'boundguard[plot]'" in res.stderr and "Traceback" not in res.stderr
    # report does not need matplotlib
    assert cli("report", runs.faulty, env={"PYTHONPATH": str(shim)}).returncode == 0


def test_explain(cli):
    e = CATALOGUE["missing_output_activation"]
    res = cli("explain", "missing_output_activation")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for heading in ("What it means", "Why it matters", "Fix", "Lightning", "Keras"):
        assert f"\n{heading}\n" in out
    flat = " ".join(out.split())
    for text in (e.meaning, e.why, e.fix, e.lightning, e.keras, e.title):
        assert " ".join(text.split()) in flat
    assert out.startswith(f"{e.code}: {e.title}\ndefault severity: {e.severity}\n")


def test_explain_markdown_and_lenient_spelling(cli):
    res = cli("explain", "Output-Out-Of-Range", "--format", "markdown")
    assert res.returncode == 0
    assert res.stdout.startswith("## `output_out_of_range`") and "```python" in res.stdout


def test_explain_unknown_code(cli):
    res = cli("explain", "output_out_of_rang")
    assert res.returncode == 2 and res.stdout == ""
    assert "unknown alert code 'output_out_of_rang'" in res.stderr
    assert "Did you mean output_out_of_range?" in res.stderr
    assert all(code in res.stderr for code in CODES)
    res = cli("explain", "zzz")
    assert res.returncode == 2 and "Did you mean" not in res.stderr and "Valid codes: " in res.stderr


def test_explain_lists_codes(cli):
    res = cli("explain")
    assert res.returncode == 0
    assert [line.split()[0] for line in res.stdout.splitlines()[: len(CODES)]] == list(CODES)


def test_imports_stay_light(cli):
    """The CLI, the report and the plot modules import no framework and no matplotlib until a plot is drawn."""
    import subprocess
    import sys

    code = ("import sys, boundguard.cli, boundguard.report, boundguard.plot; "
            "print(json.dumps(sorted(m for m in ('torch', 'lightning', 'keras', 'tensorflow', 'matplotlib', 'rich') "
            "if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", "import json; " + code], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


@pytest.mark.parametrize("code", CODES)
def test_every_code_explains(code):
    from boundguard.cli import _explain_text

    text = _explain_text(CATALOGUE[code], 80)
    assert CATALOGUE[code].lightning in text and CATALOGUE[code].keras in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("    ")) <= 80
