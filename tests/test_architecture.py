"""The shape of the code, read with `ast` (nothing is imported): no import cycle among the modules
of diffedit/ and kernels/, no Python file there over 400 lines, at most 12 modules at the top of
diffedit/, and kernels/ standing alone (none of its modules imports diffedit).

An import counts wherever it stands (module level or inside a function: a function-level import
hides a cycle from Python until the function runs, it does not remove it), absolute or relative.
`from package import name` is an import of the module package.name when that module exists, of
the package otherwise. kernels/ is installed as `diffedit.kernels` (pyproject.toml), so
kernels/attention.py is the module diffedit.kernels.attention.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"diffedit": REPO / "diffedit", "diffedit.kernels": REPO / "kernels"}  # dotted name -> folder
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 12


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages by its dotted name; a package is named by its __init__.py."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports(name: str, path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported name, relative?) of every import in the file: `import a.b` gives a.b, `from a
    import b` gives a.b (the module a.b if there is one, else the name b inside a), relative
    imports resolved against `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` is relative to the package, each further dot one level up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [(node.lineno, f"{base}.{alias.name}", node.level > 0) for alias in node.names]
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of the packages it imports (itself excluded)."""
    modules = module_files(packages)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, imported, _ in imports(name, path):
            while imported and imported not in modules:  # `from a import b` where b is not a module: a
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that lies on one (a breadth-first search back to
    it), without repeats, each as [a, b, ..., a] starting at its alphabetically first module."""
    cycles = set()
    for start in sorted(graph):
        path_to = {start: [start]}
        frontier = [start]
        while frontier and not any(start in graph[module] for module in frontier):
            next_frontier = []
            for module in frontier:
                for target in sorted(graph[module] - path_to.keys()):
                    path_to[target] = path_to[module] + [target]
                    next_frontier.append(target)
            frontier = next_frontier
        closing = [path_to[module] for module in frontier if start in graph[module]]
        if closing:
            cycle = min(closing)
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first] + [min(cycle)]))
    return [list(cycle) for cycle in sorted(cycles)]


def test_no_import_cycle():
    cycles = import_cycles(import_graph(PACKAGES))
    assert not cycles, "import cycles (break each by moving what both sides need into a module below them):\n" + \
        "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


def test_no_file_over_400_lines():
    lengths = {path.relative_to(REPO).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in module_files(PACKAGES).values()}
    too_long = {path: lines for path, lines in sorted(lengths.items()) if lines > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines (split them by what they do): {too_long}"


def test_at_most_12_modules_at_the_top_of_diffedit():
    top = sorted(path.stem for path in PACKAGES["diffedit"].glob("*.py") if path.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"diffedit/ holds {len(top)} modules at its top level, more than {MAX_TOP_LEVEL_MODULES}; "
        f"move some into a subpackage: {top}")


def imports_of_the_parent(package: str, folder: Path) -> list[str]:
    """Where a module of `package` (a subpackage, e.g. diffedit.kernels) imports the package it is
    installed in, as "file:line imports name". Its own modules it may import, relatively only: an
    absolute `diffedit.kernels.x` runs diffedit's __init__ too."""
    root = package.split(".")[0]
    offences = []
    for name, path in module_files({package: folder}).items():
        for line, imported, relative in imports(name, path):
            own_module = relative and (imported + ".").startswith(package + ".")
            if imported.split(".")[0] == root and not own_module:
                offences.append(f"{path.name}:{line} imports {imported}")
    return offences


def test_kernels_do_not_import_diffedit():
    offences = imports_of_the_parent("diffedit.kernels", PACKAGES["diffedit.kernels"])
    assert not offences, "kernels/ must not import diffedit (pass tensors, return tensors): " + "; ".join(offences)


# --- the checker itself, on a small made-up package ----------------------------------------------

@pytest.fixture
def toy_packages(tmp_path) -> dict[str, Path]:
    """pkg: a -> b at module level, b -> a inside a function (`from pkg import a`), c -> d by a
    relative import and d -> c by an absolute one; e imports a name of pkg (not a module) and the
    standard library, which make no cycle; kern (mapped as pkg.kern) imports pkg.e."""
    files = {
        "pkg/__init__.py": "VERSION = 1\n",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "def f():\n    from pkg import a\n    return a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from . import d\n",
        "pkg/sub/d.py": "from pkg.sub.c import something\n",
        "pkg/e.py": "import os\nfrom pkg import VERSION\nfrom .sub import c\n",
        "kern/k.py": "from . import m\nfrom pkg.e import x\n",
        "kern/m.py": "import math\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return {"pkg": tmp_path / "pkg", "pkg.kern": tmp_path / "kern"}


def test_the_checker_finds_cycles_and_resolves_imports(toy_packages):
    graph = import_graph(toy_packages)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}       # function-level `from pkg import a`
    assert graph["pkg.sub.c"] == {"pkg.sub.d"} and graph["pkg.sub.d"] == {"pkg.sub.c"}
    assert graph["pkg.e"] == {"pkg", "pkg.sub.c"}                           # VERSION is a name of pkg
    assert graph["pkg.kern.k"] == {"pkg.kern.m", "pkg.e"} and graph["pkg.kern.m"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub.c", "pkg.sub.d", "pkg.sub.c"]]
    graph["pkg.b"].clear()
    graph["pkg.sub.d"] = {"pkg.e"}                                           # c -> d -> e -> c: one cycle of three
    assert import_cycles(graph) == [["pkg.e", "pkg.sub.c", "pkg.sub.d", "pkg.e"]]


def test_the_checker_sees_kernels_importing_the_package(toy_packages):
    assert imports("pkg.kern.k", toy_packages["pkg.kern"] / "k.py") == [(1, "pkg.kern.m", True), (2, "pkg.e.x", False)]
    assert imports_of_the_parent("pkg.kern", toy_packages["pkg.kern"]) == ["k.py:2 imports pkg.e.x"]
