"""The README's catalogue table is generated from the catalogue."""
from __future__ import annotations

import subprocess
import sys

import pytest

from boundguard.catalogue import CATALOGUE, CATALOGUE_END, CATALOGUE_START, CODES, catalogue_markdown, replace_catalogue


def test_table_has_one_row_per_code():
    lines = catalogue_markdown().splitlines()
    assert lines[0] == "| code | default severity | fires when | fix |"
    assert lines[1] == "| --- | --- | --- | --- |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| `{c}`" for c in CODES]
    for line, code in zip(lines[2:], CODES):
        cells = line.strip("| ").split(" | ")
        assert cells == [f"`{code}`", CATALOGUE[code].severity, CATALOGUE[code].meaning, CATALOGUE[code].fix]


def _module(*args):
    return subprocess.run([sys.executable, "-m", *args], check=False, capture_output=True, text=True)


def test_module_prints_table_and_updates_readme(tmp_path):
    res = _module("boundguard.catalogue")
    assert res.returncode == 0 and res.stdout == catalogue_markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{CATALOGUE_START}\nold table\n{CATALOGUE_END}\n\nmore\n")
    res = _module("boundguard.catalogue", "--write-readme", str(readme))
    assert res.returncode == 0, res.stderr
    assert readme.read_text() == f"# x\n\n{CATALOGUE_START}\n{catalogue_markdown()}{CATALOGUE_END}\n\nmore\n"
    assert "already up to date" in _module("boundguard.catalogue", "--write-readme", str(readme)).stdout
    res = _module("boundguard.catalogue", "--write-readme", str(tmp_path / "missing.md"))
    assert res.returncode == 2 and "missing.md" in res.stderr


def test_the_old_command_still_works_for_one_release():
    res = _module("boundguard.report", "--catalogue")
    assert res.returncode == 0 and res.stdout == catalogue_markdown()
    assert "python -m boundguard.catalogue" in res.stderr


def test_replace_needs_markers():
    with pytest.raises(ValueError, match="markers"):
        replace_catalogue("no markers here")
