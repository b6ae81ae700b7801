"""README.md's alert catalogue table is exactly the one generated from the catalogue.

Regenerate it with ``python -m boundguard.catalogue --write-readme README.md`` (or print it with
``python -m boundguard.catalogue`` and paste it between the markers).
"""
from __future__ import annotations

from pathlib import Path

from boundguard.catalogue import CATALOGUE_END, CATALOGUE_START, catalogue_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_catalogue_matches_the_catalogue():
    text = README.read_text(encoding="utf-8")
    assert text.count(CATALOGUE_START) == 1 and text.count(CATALOGUE_END) == 1, (
        f"README.md needs one {CATALOGUE_START} ... {CATALOGUE_END} block; "
        "fill it with: python -m boundguard.catalogue --write-readme README.md")
    start = text.index(CATALOGUE_START) + len(CATALOGUE_START)
    block = text[start: text.index(CATALOGUE_END)]
    assert block.strip() == catalogue_markdown().strip(), (
        "README.md's alert catalogue differs from boundguard/catalogue.py; "
        "regenerate it with: python -m boundguard.catalogue --write-readme README.md")
