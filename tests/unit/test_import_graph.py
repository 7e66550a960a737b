"""The import graph of kcons/: no file-level import cycle, confluent_kafka only behind kcons.kafka.

click is imported, and signal handlers are installed, only under kcons/cli/ (library classes
offer ``stop()``).

Every ``import`` and ``from ... import`` in every module counts, wherever it stands (module
level, inside a function, inside ``try``), except those under ``if TYPE_CHECKING:``, which never
run. Relative imports are resolved; ``from package import name`` is an edge to the submodule
when ``name`` is one, and ``from kcons import Name`` follows ``kcons._EXPORTS`` to the module
that defines ``Name``. Importing a submodule does not count as importing its parent package's
``__init__`` (that is where every package's face would make a cycle of nothing).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kcons"

# Parts allowed to import confluent_kafka: the Kafka layer itself, and the test support.
KAFKA_ALLOWED = ("kcons.kafka", "kcons.testing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, *, skip_type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if skip_type_checking and isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield from _imports_of_stmt(sub, skip_type_checking=skip_type_checking)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child, skip_type_checking=skip_type_checking)


def _imports_of_stmt(stmt: ast.stmt, *, skip_type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        yield stmt
    yield from _imports(stmt, skip_type_checking=skip_type_checking)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, resolving ``from . import x`` and ``from ..a import b``."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _lazy_exports() -> dict[str, str]:
    """``kcons._EXPORTS`` read from the source (name -> defining module)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and node.value is not None:
                value = ast.literal_eval(node.value)
                assert isinstance(value, dict)
                return value
    return {}


EXPORTS = _lazy_exports()


def _nearest_module(name: str) -> str | None:
    """The kcons module a dotted name lives in (``kcons.a.b.C`` -> ``kcons.a.b``), or None outside kcons."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _targets(module: str, *, skip_type_checking: bool = True) -> Iterator[tuple[str, int]]:
    """(imported name, line) for every import in ``module``: kcons modules resolved, others as written."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in _imports(tree, skip_type_checking=skip_type_checking):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
            continue
        source = _absolute(module, node)
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:
                yield full, node.lineno
            elif source == "kcons" and alias.name in EXPORTS:
                yield EXPORTS[alias.name], node.lineno
            else:
                yield source, node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _line in _targets(module):
            resolved = _nearest_module(target)
            if resolved is not None and resolved != module:
                graph[module].add(resolved)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_resolves_relative_and_lazy_imports() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _absolute("kcons.outbox.relay", ast.ImportFrom(module="rows", names=[], level=1)) == "kcons.outbox.rows"
    assert _absolute("kcons.outbox", ast.ImportFrom(module="rows", names=[], level=1)) == "kcons.outbox.rows"
    assert _absolute("kcons.outbox.relay", ast.ImportFrom(module="errors", names=[], level=2)) == "kcons.errors"
    assert EXPORTS["Envelope"] == "kcons.envelope"
    assert "kcons.envelope" in _graph()["kcons.outbox.writer"]


def test_no_file_level_import_cycle_in_kcons() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a set of modules that reach each other): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_only_the_kafka_layer_and_testing_import_confluent_kafka() -> None:
    offenders = sorted({
        f"{MODULES[module].relative_to(ROOT)}:{line}"
        for module in MODULES
        if not module.startswith(KAFKA_ALLOWED)
        for target, line in _targets(module, skip_type_checking=False)
        if target == "confluent_kafka" or target.startswith("confluent_kafka.")
    })
    assert not offenders, "confluent_kafka imported outside kcons/kafka/ and kcons/testing/: " + ", ".join(offenders)


def _installs_signal_handler(call: ast.Call) -> bool:
    """``signal.signal(...)``, ``signal(...)`` imported from signal, or ``loop.add_signal_handler(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "add_signal_handler" or (
            func.attr == "signal" and isinstance(func.value, ast.Name) and func.value.id == "signal"
        )
    return False


def test_only_the_cli_imports_click_and_installs_signal_handlers() -> None:
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("kcons.cli"):
            continue
        tree = ast.parse(path.read_text())
        offenders += [
            f"{path.relative_to(ROOT)}:{line} imports click"
            for target, line in _targets(module, skip_type_checking=False)
            if target == "click" or target.startswith("click.")
        ]
        offenders += [
            f"{path.relative_to(ROOT)}:{node.lineno} installs a signal handler"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and _installs_signal_handler(node)
        ]
    assert not offenders, "; ".join(offenders)
