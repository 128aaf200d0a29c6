"""Who may import whom: the core never touches Airflow, the chat backends share only backends/chat.py,
the vLLM engine worker runs on the standard library, and no operator module imports another in a circle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "src" / "babelsynth"
BACKENDS = CORE / "backends"


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules a file imports (absolute names; `from . import x` resolved against the operators package)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from operators import stage`
    return out


def _strings(path: Path) -> list[str]:
    """String constants of a file, docstrings excluded."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


AIRFLOW_NAME = re.compile(
    r"^airflow(\.\w+)*$|AIRFLOW_CONN"
)  # a module's name, or Airflow's connection env vars


def test_core_package_never_imports_or_inspects_airflow():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20
    bad = {}
    for f in files:
        hits = [m for m in _imports(f) if m.split(".")[0] == "airflow"]
        hits += [s for s in _strings(f) if AIRFLOW_NAME.search(s)]  # sys.modules["airflow.sdk"], env names
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert bad == {}


def test_the_check_above_catches_what_it_must(tmp_path):
    """The AST check sees an import, a sys.modules lookup and a connection env var, not a docstring."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        '"""Runs under airflow.sdk too."""\n'
        "import sys\n"
        "def f():\n"
        "    from airflow.sdk import Connection\n"
        '    return sys.modules["airflow.sdk"], "AIRFLOW_CONN_X"\n'
    )
    assert "airflow.sdk" in _imports(probe)
    assert sorted(s for s in _strings(probe) if AIRFLOW_NAME.search(s)) == ["AIRFLOW_CONN_X", "airflow.sdk"]


def test_importing_the_core_loads_no_airflow():
    code = (
        "import sys\n"
        "import babelsynth.backends.chat_http, babelsynth.backends.vllm_offline, babelsynth.runner\n"
        "import babelsynth.stages, babelsynth.cli, babelsynth.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_chat_backends_share_only_the_chat_module():
    http, offline = _imports(BACKENDS / "chat_http.py"), _imports(BACKENDS / "vllm_offline.py")
    assert not any("vllm_offline" in m or "vllm_worker" in m for m in http)
    assert not any("chat_http" in m for m in offline)
    assert "babelsynth.backends.chat" in http & offline


def test_vllm_worker_runs_on_the_standard_library_alone():
    """It is started with the vLLM venv's python, where babelsynth is not installed."""
    top = {m.split(".")[0] for m in _imports(BACKENDS / "vllm_worker.py", top_level_only=True)}
    assert top and top <= set(sys.stdlib_module_names) | {"__future__"}, top
    assert not any(m.startswith("babelsynth") for m in _imports(BACKENDS / "vllm_worker.py"))


def test_operator_modules_import_each_other_without_a_cycle():
    mods = {p.stem: p for p in (ROOT / "operators").glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {m.split(".")[1] for m in _imports(p) if m.startswith("operators.") and m.split(".")[1] in mods}
        for name, p in mods.items()
    }
    assert graph["pod"] and graph["venv"] and "stage" not in graph["pod"] | graph["venv"]
    assert {"pod", "venv"} <= graph["stage"]  # lazily, where the placement says so

    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, n])}"
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(graph[n]):
            visit(m, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
