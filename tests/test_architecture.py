"""The import graph flows one way, the core never touches Airflow, and private names stay private.

Read from the source (AST), so the test sees lazy imports inside functions too: a cycle hidden in a
function body is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = ("babelsynth", "operators", "tinymodels", "localstack")
# Where layout.py's helpers are the only way into a run's files; tests and benchmarks count too.
CHECKED_DIRS = (
    "src/babelsynth",
    "operators",
    "dags",
    "scripts",
    "benchmarks",
    "tests",
    "tinymodels",
    "localstack",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs if (ROOT / d).exists() for p in (ROOT / d).rglob("*.py"))


MODULES = {_module_name(p): p for p in _files("src/babelsynth", "operators", "tinymodels", "localstack")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """(imported module, names imported from it, node) for every import statement, at any depth."""
    skip = {
        id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and _is_type_checking(i) for n in ast.walk(i)
    }
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names], node


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for target, names, _ in _imports(tree, mod, path.name == "__init__.py"):
            if not target.startswith(INTERNAL):
                continue
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for dep in subs or [target]:
                if dep in MODULES and dep != mod:
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own submodules is how a registry is built, not a cycle."""
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_the_import_graph_has_no_cycle():
    cycles = _cycles(_package_inits(_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_dependencies_flow_one_way():
    """cli/operators -> runner -> stages/gates -> layout/storage; regate sits on top of the runner."""
    graph = _graph()
    assert "babelsynth.runner" not in graph["babelsynth.layout"] | graph["babelsynth.storage"]
    assert not {d for d in graph["babelsynth.layout"] if d.startswith("babelsynth.")} - {"babelsynth.storage"}
    assert "babelsynth.runner" in graph["babelsynth.regate"]
    for low in ("babelsynth.runner", "babelsynth.gating", "babelsynth.layout"):
        assert "babelsynth.regate" not in graph[low], (
            f"{low} imports regate (it must sit on top of the runner)"
        )
    for stage in (m for m in MODULES if m.startswith("babelsynth.stages.")):
        assert not graph[stage] & {"babelsynth.runner", "babelsynth.gating", "babelsynth.regate"}, stage


def test_the_core_package_never_imports_airflow():
    offenders = []
    for mod, path in MODULES.items():
        if not mod.startswith("babelsynth"):
            continue
        tree = ast.parse(path.read_text())
        for target, _, node in _imports(tree, mod, path.name == "__init__.py"):
            if target == "airflow" or target.startswith("airflow."):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
        for node in ast.walk(tree):  # sys.modules["airflow..."] is inspecting Airflow all the same
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("airflow.")
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.value!r}")
    assert not offenders, offenders


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    internal_aliases: dict[str, str] = {}
    out = []
    for target, _names, node in _imports(tree, _module_name(path), path.name == "__init__.py"):
        if not target.startswith(INTERNAL):
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                internal_aliases[a.asname or a.name.split(".")[0]] = a.name
        for a in getattr(node, "names", []):
            n = a.name
            if isinstance(node, ast.ImportFrom):
                if n.startswith("_") and not n.startswith("__"):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{n}")
                elif f"{target}.{n}" in MODULES or target in INTERNAL:
                    internal_aliases[a.asname or n] = f"{target}.{n}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in internal_aliases
        ):
            out.append(
                f"{path.relative_to(ROOT)}:{node.lineno} uses {internal_aliases[node.value.id]}.{node.attr}"
            )
    return out


def test_nothing_uses_another_modules_private_names():
    offenders = [u for p in _files(*CHECKED_DIRS) if p.name != "layout.py" for u in _private_uses(p)]
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def test_private_use_detection_finds_a_planted_use(tmp_path, monkeypatch):
    f = ROOT / "tests" / "_planted_private_use.py"
    try:
        f.write_text("from babelsynth import runner\nfrom babelsynth.storage import _local\nrunner._x()\n")
        found = _private_uses(f)
    finally:
        f.unlink()
    assert len(found) == 2 and "babelsynth.storage._local" in found[0] and "runner._x" in found[1]
