"""The layers of docs/architecture.md, measured from the imports of every module of the package.

Every `import` and `from ... import` counts, the ones inside functions too: a function-level import
still ties the two modules together, it only hides the tie until the function runs. Files map to
module names through the `package_dir` mapping of setup.py (`ROOTS`), so a moved folder is followed.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE, AGENT, CONVERTER = "edgefleet", "edgefleet.agent", "edgefleet.converter"
TESTING = "edgefleet.testing"
"""The harness of the suite and the benchmarks (real brokers, agent processes): it sits above both
halves and may import them; nothing else in the package imports it."""
COMMANDS = f"{CONVERTER}.commands"
CONVERTER_CLI = f"{CONVERTER}.cli"


@dataclass(frozen=True)
class Import:
    """One imported module (and the name taken from it, for `from module import name`)."""

    importer: str
    module: str
    name: str | None
    line: int

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


def roots() -> dict[str, str]:
    """setup.py's `ROOTS` (module prefix -> folder), read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ROOTS"
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return value
    raise AssertionError("setup.py has no ROOTS mapping")


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found: dict[str, Path] = {}
    for prefix, folder in roots().items():
        base = REPO / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def owner(name: str) -> str:
    """The layer a module belongs to: the most specific root prefix, or the testing harness."""
    if name == TESTING or name.startswith(TESTING + "."):
        return TESTING
    return max((p for p in roots() if name == p or name.startswith(p + ".")), key=len)


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def imports_of(name: str) -> Iterator[Import]:
    """The project modules `name` imports, wherever the import statement sits."""
    tree = ast.parse(modules()[name].read_text(), filename=str(modules()[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == CORE or alias.name.startswith(CORE + "."):
                    yield Import(name, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == CORE or source.startswith(CORE + ".")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules():  # `from package import module`
                    yield Import(name, submodule, None, node.lineno)
                else:
                    yield Import(name, source, alias.name, node.lineno)


@functools.cache
def all_imports() -> tuple[Import, ...]:
    return tuple(imp for name in sorted(modules()) for imp in imports_of(name))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_folder_is_found() -> None:
    names = modules()
    for prefix in (CORE, AGENT, CONVERTER, COMMANDS, CONVERTER_CLI, f"{CORE}.protocol.topics"):
        assert prefix in names, prefix
    assert owner(f"{AGENT}.lifecycle.machine") == AGENT
    assert owner(f"{CORE}.errors") == CORE
    assert owner(f"{TESTING}.broker") == TESTING


def test_every_import_names_a_module() -> None:
    bad = [f"{imp.where()} imports {imp.module}, which is not a module" for imp in all_imports()
           if imp.module not in modules()]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.module != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.module)
    found = cycles(graph)
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_the_core_imports_neither_half() -> None:
    bad = [f"{imp.where()} imports {imp.module}" for imp in all_imports()
           if owner(imp.importer) == CORE and owner(imp.module) != CORE]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_nothing_in_the_package_imports_the_testing_harness() -> None:
    bad = [f"{imp.where()} imports {imp.module}" for imp in all_imports()
           if owner(imp.module) == TESTING and owner(imp.importer) != TESTING]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_the_halves_do_not_import_each_other() -> None:
    bad = [f"{imp.where()} imports {imp.module}" for imp in all_imports()
           if {owner(imp.importer), owner(imp.module)} == {AGENT, CONVERTER}]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_no_private_name_is_imported_from_another_module() -> None:
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    bad = [f"{imp.where()} imports {imp.name or imp.module} from {imp.module}" for imp in all_imports()
           if (imp.name and private(imp.name)) or any(private(part) for part in imp.module.split("."))]
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_commands_are_imported_by_the_cli_only() -> None:
    bad = [f"{imp.where()} imports {imp.module}" for imp in all_imports()
           if (imp.module == COMMANDS or imp.module.startswith(COMMANDS + "."))
           and imp.importer != CONVERTER_CLI]
    assert not bad, "\n".join(dict.fromkeys(bad))
