"""Every docstring example of the core (the modules of ``boundguard/``) runs, and must pass.

A module without examples passes trivially; the adapters (``boundguard.integrations``, which need
their frameworks) are not part of the core and are not collected here.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import boundguard

MODULES = ["boundguard"] + sorted(
    m.name for m in pkgutil.walk_packages(boundguard.__path__, prefix="boundguard.")
    if not m.name.startswith("boundguard.integrations")
)


def test_every_core_module_is_collected():
    for name in ("boundguard.report", "boundguard.plot", "boundguard.cli", "boundguard.monitor",
                 "boundguard.stats", "boundguard.rules", "boundguard.config", "boundguard.bounds"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(verbose=False)
    report: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed:\n" + "".join(report)
