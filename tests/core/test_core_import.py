"""Importing the core pulls in no framework (contract: ``import boundguard`` imports no torch,
lightning, tensorflow or keras)."""
from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "tensorflow", "keras", "jax")


def test_import_boundguard_imports_no_framework():
    """Every module of the core, found on disk (a new module cannot slip a framework import in)."""
    code = (
        "import sys, json, pkgutil, importlib, boundguard\n"
        "mods = [m.name for m in pkgutil.iter_modules(boundguard.__path__) if m.name != '__main__']\n"
        "for m in mods: importlib.import_module('boundguard.' + m)\n"
        "assert len(mods) >= 12, mods\n"
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        + "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_top_level_exports_only_core_types():
    import boundguard

    assert set(boundguard.__all__) == {"Alert", "BoundGuardError", "BoundGuardWarning", "Bounds", "__version__"}
    assert issubclass(boundguard.BoundGuardWarning, UserWarning)
    assert issubclass(boundguard.BoundGuardError, Exception)


def test_no_core_source_file_is_git_ignored():
    """Every module of the package must reach a commit (an ignore pattern once hid ``alerts.py``)."""
    import shutil
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = sorted(str(p.relative_to(root)) for d in ("boundguard", "integrations") for p in (root / d).rglob("*.py"))
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True,
                         check=False)
    assert out.stdout.split() == []
