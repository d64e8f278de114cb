"""The import graph of schemas < pipeline < stages < flows, built with `ast` from the source (every import
statement, at module level or inside a function, plus string constants naming one of these modules: importlib
calls, plugin lists, mock targets in product code). A module may import only its own layer or a lower one, and
no two modules may import each other, directly or round a loop."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "pipeline", "stages", "flows")


def module_files(root: Path, packages=LAYERS) -> dict[str, Path]:
    """module name -> file, for every .py under the packages (a package's __init__.py is the package)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _target(name: str, modules: dict) -> str | None:
    """The module `name` refers to: itself, or for `pkg.mod.attr` the longest module prefix."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, file: Path, modules: dict) -> set[str]:
    is_pkg = file.name == "__init__.py"
    tree = ast.parse(file.read_text(), filename=str(file))
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_target(a.name, modules) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            # `from pkg import mod` imports the module pkg.mod; `from mod import attr` imports mod
            found.update(_target(f"{base}.{a.name}", modules) for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in modules:  # importlib.import_module("pkg.mod"), a module list, ...
            found.add(node.value)  # (a bare "stages" is a word in a message more often than an import)
    return {m for m in found if m and m != name}


def import_graph(root: Path = ROOT, packages=LAYERS) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, f, modules) for name, f in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward_imports(graph: dict[str, set[str]], packages=LAYERS) -> list[str]:
    rank = {p: i for i, p in enumerate(packages)}
    layer = lambda m: rank[m.partition(".")[0]]  # noqa: E731
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a))


# ------------------------------------------------------------------------------------------------ the product
def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_schemas_and_pipeline_never_import_stages_or_flows():
    graph = import_graph()
    bad = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.split(".")[0] in ("schemas", "pipeline")
                 for b in deps if b.split(".")[0] in ("stages", "flows"))
    assert bad == []


def test_the_graph_sees_the_cli_wiring():
    """The checks above look at real edges: the top-level app imports every area's command module."""
    graph = import_graph()
    assert {"flows.cli", "stages.cli", "pipeline.train.cli", "pipeline.store_cli"} <= graph["flows.app"]
    assert "stages.generate" in graph["stages.catalog"]


# ------------------------------------------------------------------------------- the checker on a toy tree
def _toy(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph(tmp_path, ("low", "high"))


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    g = _toy(tmp_path, {"low/__init__.py": "", "low/a.py": "from low import b\n",
                        "low/b.py": "def f():\n    from low.a import x\n", "high/__init__.py": ""})
    assert cycles(g) == [["low.a", "low.b"]]


def test_checker_finds_upward_imports_including_by_string(tmp_path):
    g = _toy(tmp_path, {"low/__init__.py": "", "low/a.py": "import importlib\nimportlib.import_module('high.c')\n",
                        "low/b.py": "from ..high import c\n", "high/__init__.py": "", "high/c.py": "import low.a\n"})
    assert g["low.a"] == {"high.c"} and g["high.c"] == {"low.a"}
    assert upward_imports(g, ("low", "high")) == ["low.a -> high.c"]
