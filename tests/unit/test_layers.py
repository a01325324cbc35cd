"""The packages are layers and imports point one way (issue 23).

``MAY_IMPORT`` is the single source of the layering: each package and the packages below it that it
may import. docs/design.md and every package's ``__init__`` docstring say the same (checked here).
Every import counts, wherever it is written: module level, inside a function (lazy), or under
``TYPE_CHECKING``; a lazy import still ties the two modules together, and hiding a cycle behind one is
how the cycles this test forbids came about.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "shards": frozenset({"core"}),
    "dht": frozenset({"core", "shards"}),
    "net": frozenset({"core", "shards", "dht"}),
    "peers": frozenset({"core", "shards", "dht", "net"}),
    "trainer": frozenset({"core", "shards", "dht", "net", "peers"}),
    "delegation": frozenset({"core", "shards", "dht", "net", "peers"}),
    "bootstrap": frozenset({"core", "shards", "dht", "net", "peers"}),
    "swarm": frozenset({"core", "shards", "dht", "net", "peers", "trainer", "delegation", "bootstrap"}),
}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` imports ``target`` at ``path:line`` as written in ``text``."""

    source: str
    target: str
    path: Path
    line: int
    text: str

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}: {self.text}"


def find_modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def read_imports(modules: dict[str, Path]) -> list[Import]:
    """The project-internal imports of every module, resolved to the module they load."""
    found = []
    for name, path in modules.items():
        source = path.read_text()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                text = " ".join(ast.get_source_segment(source, node).split())
                for target in _targets(node, name, is_package, modules):
                    found.append(Import(name, target, path, node.lineno, text))
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [_known(name, modules) for name in names if _known(name, modules) is not None]


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``import a.b.c`` loads ``a.b.c``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def upward_imports(imports: list[Import], may_import: dict[str, frozenset[str]], root: Path) -> list[str]:
    """Each import of a package that ``may_import`` does not allow its importer, as a message."""
    problems = []
    for edge in imports:
        here, there = edge.source.split(".")[0], edge.target.split(".")[0]
        if here != there and there not in may_import[here]:
            problems.append(f"{edge.where(root)}  ({edge.source} imports {edge.target}: {here} may import "
                            f"{', '.join(sorted(may_import[here])) or 'nothing of the project'})")
    return problems


def import_cycles(imports: list[Import], root: Path) -> list[str]:
    """Each set of modules that import each other in a circle, with the imports that close it."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in imports:
        if edge.source != edge.target:
            graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
    problems = []
    for component in _strongly_connected(graph):
        inside = [edge for source in sorted(component) for target, edge in sorted(graph.get(source, {}).items())
                  if target in component]
        lines = "\n    ".join(f"{edge.where(root)}  ({edge.source} -> {edge.target})" for edge in inside)
        problems.append(f"cycle between {', '.join(sorted(component))}:\n    {lines}")
    return problems


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; only the components of more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _may_import_line(package: str) -> str:
    below = [name for name in MAY_IMPORT if name in MAY_IMPORT[package]]
    return f"May import: {', '.join(below) or 'nothing of the project'}"


@pytest.fixture(scope="module")
def project_imports() -> list[Import]:
    return read_imports(find_modules(ROOT, list(MAY_IMPORT)))


def test_no_package_imports_one_above_it(project_imports: list[Import]) -> None:
    problems = upward_imports(project_imports, MAY_IMPORT, ROOT)
    assert not problems, "imports against the layering (tests/unit/test_layers.py MAY_IMPORT):\n" + "\n".join(problems)


def test_no_module_imports_itself_in_a_circle(project_imports: list[Import]) -> None:
    problems = import_cycles(project_imports, ROOT)
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_every_package_is_in_the_table_and_the_build() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(MAY_IMPORT)
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert {name.strip(' "*') for name in include.split(",")} == set(MAY_IMPORT)


def test_the_table_is_a_layering() -> None:
    for package, below in MAY_IMPORT.items():
        assert package not in below
        for lower in below:
            assert MAY_IMPORT[lower] < below, f"{package} may import {lower} but not all that {lower} may"


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_package_docstrings_state_the_layering(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    assert _may_import_line(package) in " ".join(doc.split()), f"{package}/__init__.py"


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_design_doc_states_the_layering(package: str) -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    row = re.search(rf"^\| `{package}/` \|.*\| (.*) \|$", design, re.MULTILINE)
    assert row is not None, f"docs/design.md has no layering row for {package}/"
    assert row.group(1) == (", ".join(name for name in MAY_IMPORT if name in MAY_IMPORT[package]) or "nothing")


# -- the checks themselves, on a made-up tree -----------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_imports(find_modules(tmp_path, ["low", "high"]))


LOW_HIGH = {"low": frozenset(), "high": frozenset({"low"})}


@pytest.mark.parametrize("text", [
    "from high.api import run\n",
    "import high.api\n",
    "def later():\n    from high import api\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from high.api import run\n",
])
def test_an_upward_import_is_named_with_its_line(tmp_path: Path, text: str) -> None:
    imports = _tree(tmp_path, {"low/__init__.py": "", "low/base.py": text, "high/__init__.py": "",
                               "high/api.py": "from low.base import x\n"})
    problems = upward_imports(imports, LOW_HIGH, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"low/base.py:{text.count(chr(10))}: ") and "low.base imports high.api" in problems[0]


def test_a_lazy_cycle_inside_a_package_is_named(tmp_path: Path) -> None:
    imports = _tree(tmp_path, {"low/__init__.py": "", "low/a.py": "from low.b import f\n",
                               "low/b.py": "def f():\n    from . import c\n", "low/c.py": "import low.a\n"})
    assert upward_imports(imports, LOW_HIGH, tmp_path) == []
    (problem,) = import_cycles(imports, tmp_path)
    assert problem.startswith("cycle between low.a, low.b, low.c:")
    assert "low/b.py:2: from . import c  (low.b -> low.c)" in problem


def test_imports_that_point_one_way_pass(tmp_path: Path) -> None:
    imports = _tree(tmp_path, {"low/__init__.py": "from low.a import f\n", "low/a.py": "import os\n",
                               "high/__init__.py": "", "high/api.py": "from low import a\nfrom high import x\n"})
    assert upward_imports(imports, LOW_HIGH, tmp_path) == [] and import_cycles(imports, tmp_path) == []
