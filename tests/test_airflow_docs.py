"""docs/airflow.md's copyable blocks, run literally against a fresh AIRFLOW_HOME: the docs cannot drift.

A block marked `<!-- tested: NAME -->` is executed as written, with bash, after the site-values and
one-host blocks it depends on (each bash is a new shell). The test supplies only what the first block asks
the reader for (the site values): its own PostgreSQL cluster, a fresh AIRFLOW_HOME, free ports and the
session's vLLM servers. The `client` block is run by tests/test_airflow_scheduler.py against `make stack`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from babelsynth.vllm_server import free_port
from localstack import postgres, procs
from localstack.settings import (
    JWT_SECRET_BYTES,
    STACK_ONLY,
    StackSettings,
    airflow_env,
    babelsynth_env,
    site_values,
)
from tests.conftest import ROOT, WORK

pytestmark = pytest.mark.slow

DOC = ROOT / "docs" / "airflow.md"
BLOCK = re.compile(r"<!-- (tested|checked): ([a-z0-9-]+) -->\n```(bash|python)\n(.*?)```", re.S)
RUN_HERE = ("site", "airflow-one-host", "input", "init", "probe", "start", "health", "stop")
RUN_BY_THE_STACK_TEST = ("client",)
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def doc_blocks() -> dict[str, tuple[str, str]]:
    """Label -> (kind, code) of every marked block."""
    out = {}
    for kind, label, _lang, code in BLOCK.findall(DOC.read_text()):
        assert label not in out, f"two blocks labelled {label!r} in {DOC}"
        out[label] = (kind, code)
    return out


def clean_env() -> dict[str, str]:
    """The caller's environment without any Airflow or babelsynth setting (conftest sets some), with the
    venv first on PATH as the docs ask."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "BABELSYNTH_")) and k != "PYTHONWARNINGS"
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["BABELSYNTH_VLLM_PYTHON"] = os.environ["BABELSYNTH_VLLM_PYTHON"]
    return env


class Site:
    """The reader's site values, a private PostgreSQL, and a runner for the doc's blocks."""

    def __init__(self, settings: StackSettings, extra: dict[str, str]):
        self.settings, self.extra = settings, extra
        self.blocks = doc_blocks()

    @property
    def env(self) -> dict[str, str]:
        return {**clean_env(), **site_values(self.settings), **self.extra}

    def run(self, *labels: str, timeout: float = 600, tail: str = "") -> subprocess.CompletedProcess:
        """site + one-host blocks, then `labels`, in one bash (-e: the first failing line fails it)."""
        code = "\n".join(self.blocks[n][1] for n in ("site", "airflow-one-host", *labels)) + tail
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def sql(self, query: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(self.settings.db_url.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()


@pytest.fixture(scope="module")
def site(models, vllm_servers):
    root = Path(tempfile.mkdtemp(prefix="docs_", dir=WORK))
    s = StackSettings(
        root=root,
        models=WORK / "models",
        api_port=free_port(),
        pg_port=free_port(),
        teacher_port=vllm_servers["teacher"].port,
        llm_port=vllm_servers["llm"].port,
    )
    # Not in the docs: free log-server ports, so this Airflow never collides with another on the machine.
    extra = {
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
    }
    postgres.start(s.pg_dir, s.pg_port, s.logs / "postgres.log")
    try:
        yield Site(s, extra)
    finally:
        postgres.stop(s.pg_dir)
        shutil.rmtree(root, ignore_errors=True)


def test_every_tested_block_is_run_by_a_test():
    labels = {label for label, (kind, _) in doc_blocks().items() if kind == "tested"}
    assert labels == set(RUN_HERE) | set(RUN_BY_THE_STACK_TEST), labels


def test_the_site_block_asks_for_exactly_the_stack_site_values():
    names = re.findall(r"^export ([A-Z_]+)=", doc_blocks()["site"][1], re.M)
    assert names == list(site_values(StackSettings())), names


def test_the_one_host_block_sets_what_make_stack_sets(site):
    """Run with the stack's site values, the docs' settings are the stack's, value for value."""
    r = site.run(tail="\nenv -0")
    assert r.returncode == 0, r.stderr
    got = dict(kv.split("=", 1) for kv in r.stdout.split("\0") if "=" in kv)
    stack = {k: v for k, v in airflow_env(site.settings).items() if k not in STACK_ONLY}
    assert {k: got.get(k) for k in stack} == stack
    documented = {k for k in got if k.startswith("AIRFLOW__")} - set(site.extra)
    assert documented == set(stack) - {"AIRFLOW_HOME"}, documented ^ set(stack)
    for k in ("BABELSYNTH_CONFIG", "BABELSYNTH_TRAIN_CONFIG", "BABELSYNTH_GENERATE_SCHEDULE"):
        assert got[k] == babelsynth_env(site.settings)[k], k
    assert got["PYTHONPATH"].startswith(f"{ROOT / 'src'}:{ROOT}")
    secret = (site.settings.home / "jwt_secret").read_text().strip()
    assert len(secret.encode()) >= JWT_SECRET_BYTES and got["AIRFLOW__API_AUTH__JWT_SECRET"] == secret
    assert (site.settings.home / "jwt_secret").stat().st_mode & 0o077 == 0  # the secret is not world-readable


def test_input_init_and_probe_blocks_configure_a_fresh_home(site):
    r = site.run("input", "init", "probe")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (site.settings.work / "input" / "samples.parquet").is_file()
    assert site.sql("SELECT slots, include_deferred FROM slot_pool WHERE pool = 'gpu'") == [(1, True)]
    assert r.stdout.count("ok: ") == 2 and "endpoints answered" in r.stdout, r.stdout[-2000:]


def test_start_health_unpause_and_stop_blocks(site):
    """The components start as the doc says, become healthy, the DAGs unpause as stated, and the stop
    block leaves no process behind."""
    run_dir = site.settings.home / "run"
    r = site.run("start")
    assert r.returncode == 0, r.stderr
    pids = {c: int((run_dir / f"{c}.pid").read_text()) for c in COMPONENTS}
    try:
        h = site.run("health", timeout=900)
        logs = "\n".join(f"--- {c}\n{(run_dir / f'{c}.log').read_text()[-2000:]}" for c in COMPONENTS)
        assert h.returncode == 0, h.stderr[-3000:] + logs
        shown = json.loads(h.stdout[h.stdout.index("{") : h.stdout.index("}") + 1])
        assert set(shown) == {"admin"} and shown["admin"]  # the password the doc says to read
        paused = dict(site.sql("SELECT dag_id, is_paused FROM dag WHERE dag_id LIKE 'babelsynth%'"))
        assert paused == {"babelsynth_generate": False, "babelsynth_train": False}, paused
        assert "InsecureKeyLengthWarning" not in logs
    finally:
        s = site.run("stop")
        deadline = time.monotonic() + 60
        while any(procs.session_pids(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {c: procs.session_pids(p) for c, p in pids.items() if procs.session_pids(p)}
        for sid_pids in left.values():  # never leave them running, but fail below
            for p in sid_pids:
                os.kill(p, signal.SIGKILL)
    assert s.returncode == 0, s.stderr
    assert not left, f"still running after the stop block: {left}"
    ports = {site.settings.api_port, *map(int, site.extra.values())} & procs.listening_ports()
    assert not ports, f"ports still listening: {ports}"


def test_several_hosts_block_uses_only_real_airflow_options():
    from airflow.configuration import conf

    code = doc_blocks()["airflow-hosts"][1]
    names = re.findall(r"\b(AIRFLOW__([A-Z_]+?)__([A-Z_]+))=", code)
    assert names
    described = conf.configuration_description  # every option Airflow documents (has_option is False
    for (
        full,
        section,
        key,
    ) in names:  # for an option whose default is computed, e.g. execution_api_server_url)
        options = described.get(section.lower(), {}).get("options", {})
        assert key.lower() in options, f"{full} is not an Airflow option"
    shared = {n for n, *_ in names}
    for must in (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__API__SECRET_KEY",
    ):
        assert must in shared, must
