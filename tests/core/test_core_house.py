"""House rules of the source tree, read with ``ast`` (nothing is imported): no import circle among the
modules of ``boundguard/`` and ``integrations/`` (module-level imports, the ones that run on import), and
no module importing another module's private (``_underscore``) name."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
#: Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"boundguard": "boundguard", "integrations": "boundguard.integrations"}

#: (importing module, imported module, private name) -> why it is allowed, for now (none is: a name shared
#: across modules is public).
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def _runtime_body(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is imported: the top level, inside ``if``/``try``/``with``
    blocks, but not under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":``, nor in functions."""
    for node in body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" in test or "__name__" in test:
                yield from _runtime_body(node.orelse)
                continue
            yield from _runtime_body(node.body)
            yield from _runtime_body(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _runtime_body(block)
        elif isinstance(node, ast.With):
            yield from _runtime_body(node.body)
        else:
            yield node


def _imported_from(module: str, node: ast.ImportFrom) -> Optional[str]:
    if not node.level:
        return node.module
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(module: str, *, runtime: bool) -> Iterator[tuple[str, Optional[str]]]:
    """``(imported module, name)`` of each import of ``module`` (``name`` None for ``import x``); only
    the module-level ones that run on import when ``runtime``, else every one (functions included)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    nodes = _runtime_body(tree.body) if runtime else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _imported_from(module, node)
            for a in node.names:
                if source is not None:
                    yield source, a.name


def edges(module: str) -> set[str]:
    out = set()
    for source, name in imports(module, runtime=True):
        target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
        if target in MODULES and target != module:
            out.add(target)
    return out


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = {m: edges(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def private_imports() -> list[tuple[str, str, str]]:
    """``(module, imported module, name)`` for every private name a module takes from another one: by
    ``from x import _name`` or as ``x._name`` on an imported module (in functions too)."""
    found = []
    for module, path in MODULES.items():
        aliases = {}
        for source, name in imports(module, runtime=False):
            if name is not None and name.startswith("_") and not name.startswith("__") and source != module:
                if source in MODULES or source.split(".")[0] == "boundguard":
                    found.append((module, source, name))
            if name is None and source in MODULES:
                aliases[source.split(".")[0]] = source
            elif name is not None and f"{source}.{name}" in MODULES:
                aliases[name] = f"{source}.{name}"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) or isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and (a.name in aliases or a.name in MODULES):
                        aliases[a.asname] = aliases.get(a.name, a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = aliases[node.value.id]
                if target != module:
                    found.append((module, target, node.attr))
    return sorted(set(found))


def test_the_tree_is_read():
    assert {"boundguard.fmt", "boundguard.session", "boundguard.integrations.torch.engine",
            "boundguard.integrations.keras"} <= set(MODULES)
    assert "boundguard.sinks" in edges("boundguard.monitor")


def test_no_import_circle():
    assert cycles() == []


def test_no_private_name_is_imported_across_modules():
    """(An entry of :data:`ALLOWED_PRIVATE` that no longer occurs can go.)"""
    assert [f for f in private_imports() if f not in ALLOWED_PRIVATE] == []


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """A circle and a private import, planted in a copy of two modules, are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from boundguard.b import _secret\n")
    b.write_text("import boundguard.a as other\n\ndef f():\n    return other._hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {**MODULES, "boundguard.a": a, "boundguard.b": b})
    assert ["boundguard.a", "boundguard.b"] in cycles()
    found = private_imports()
    assert ("boundguard.a", "boundguard.b", "_secret") in found and ("boundguard.b", "boundguard.a", "_hidden") in found
