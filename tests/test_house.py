"""House rules of the source tree, checked statically with :mod:`ast` over bayescurv/**/*.py.

(a) No ``from bayescurv.x import _name``: a private name is not imported from another module.
(b) No ``obj._name`` on a receiver other than ``self``/``cls`` when ``_name`` is private to
    *another* bayescurv module. The receiver's type is not known statically, so the check is
    an approximation by name: ``_name`` counts as private to module M when M defines it
    (``def _name``, ``class _Name``, a module or class level ``_name = ...``, or
    ``self._name = ...``/``cls._name = ...``). An access ``x._name`` is flagged when the
    accessing module defines no ``_name`` of its own but some other bayescurv module does.
    Same-module access (e.g. a classmethod that builds an instance and sets ``op._eig``) is
    allowed; private attributes of third-party objects (``torch.nn.Conv2d._conv_forward``)
    are not defined in bayescurv and so are not flagged, unless bayescurv happens to reuse the
    name; such receivers are listed in :data:`THIRD_PARTY` with the reason.
(c) No runtime import cycle among bayescurv modules: the graph of module-level ``import`` /
    ``from`` statements (class bodies, ``if``/``try``/``with`` blocks included; function
    bodies and ``if TYPE_CHECKING:`` blocks excluded, as they do not run at import time).
    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
    ``pkg`` (its ``__init__``). The implicit import of parent packages is not an edge (every
    submodule would otherwise form a trivial cycle with ``bayescurv/__init__``).
(d) No bayescurv source file over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "bayescurv"
MAX_LINES = 600

THIRD_PARTY: dict[tuple[str, str], str] = {}
"""``(module, attribute)`` pairs allowed by (b): a private attribute of a third-party object
that a bayescurv module also happens to define. Empty: none needed today."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute module name of a ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_definitions(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                      and sub.value.id in ("self", "cls")):
                    names.add(sub.attr)
    return {n for n in names if _is_private(n)}


DEFINED = {name: _private_definitions(tree) for name, tree in TREES.items()}


def test_no_private_imports_across_modules():
    bad = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _resolve(module, node)
            if not source.startswith("bayescurv") or source == module:
                continue
            bad += [f"{module}:{node.lineno} from {source} import {a.name}"
                    for a in node.names if _is_private(a.name)]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_private_attributes_across_modules():
    owners: dict[str, set[str]] = {}
    for module, names in DEFINED.items():
        for n in names:
            owners.setdefault(n, set()).add(module)
    bad = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in DEFINED[module] or (module, node.attr) in THIRD_PARTY:
                continue
            others = owners.get(node.attr, set()) - {module}
            if others:
                bad.append(f"{module}:{node.lineno} .{node.attr} (private to "
                           f"{', '.join(sorted(others))})")
    assert not bad, "private attributes used across modules:\n" + "\n".join(bad)


def _runtime_imports(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            test = node.test
            type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
            if not type_checking:
                yield from _runtime_imports(node.body)
            yield from _runtime_imports(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from _runtime_imports(node.body)
        elif isinstance(node, (ast.Try, ast.With)):
            for block in ("body", "handlers", "orelse", "finalbody"):
                for part in getattr(node, block, []):
                    yield from _runtime_imports(
                        part.body if isinstance(part, ast.ExceptHandler) else [part])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, tree in TREES.items():
        for node in _runtime_imports(tree.body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                source = _resolve(module, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                           for a in node.names]
            graph[module] |= {t for t in targets if t in MODULES and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle ``[m0, m1, ..., m0]`` of ``graph``, or ``None`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_runtime_import_cycle():
    graph = import_graph()
    assert graph["bayescurv.laplace.posterior"] >= {"bayescurv.laplace.prior"}
    assert "bayescurv.laplace.posterior" not in graph["bayescurv.laplace.marglik"]
    cycle = find_cycle(graph)
    assert cycle is None, "runtime import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_source_files_are_short(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (> {MAX_LINES}): split it"
