"""The local stack's pieces without bringing it up: settings, env.sh, ports, stopping by PID, the state.

tests/test_airflow_scheduler.py brings the whole stack up and down; these are the parts a failure there
would not pin down."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from localstack import procs
from localstack.settings import (
    STACK_ONLY,
    StackSettings,
    airflow_env,
    component_env,
    env_script,
    trigger_command,
)
from localstack.stack import StackError, State, down, read_state, resolve_ports
from tests.conftest import ROOT


def test_component_env_is_hermetic_and_keeps_warnings(tmp_path):
    """The caller's Airflow settings and PYTHONWARNINGS=ignore (the Makefile exports it) never leak in."""
    s = StackSettings(root=tmp_path)
    base = {
        "PATH": "/usr/bin",
        "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor",
        "AIRFLOW_HOME": "/elsewhere",
        "AIRFLOW_CONN_X": "http://x",
        "BABELSYNTH_CONFIG": "/other.yaml",
        "PYTHONWARNINGS": "ignore",
        "HOME": "/root",
    }
    env = component_env(s, base)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor" and env["AIRFLOW_HOME"] == str(s.home)
    assert "AIRFLOW_CONN_X" not in env and "PYTHONWARNINGS" not in env and env["HOME"] == "/root"
    assert env["BABELSYNTH_CONFIG"] == str(ROOT / "configs" / "demo.yaml")
    assert env["PYTHONPATH"] == f"{ROOT / 'src'}:{ROOT}"
    assert set(STACK_ONLY) <= set(env)


def test_the_jwt_secret_is_long_enough_and_stable(tmp_path):
    s = StackSettings(root=tmp_path)
    first = airflow_env(s)["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert len(first.encode()) >= 64  # PyJWT warns below 64 bytes for HS512
    assert airflow_env(s)["AIRFLOW__API_AUTH__JWT_SECRET"] == first
    assert (s.home / "jwt_secret").stat().st_mode & 0o077 == 0


def test_env_sh_exports_what_the_components_get(tmp_path):
    s = StackSettings(root=tmp_path, api_port=18080)
    s.root.mkdir(exist_ok=True)
    s.env_file.write_text(env_script(s))
    r = subprocess.run(
        ["bash", "-c", f"source {s.env_file} && env -0"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    got = dict(kv.split("=", 1) for kv in r.stdout.split("\0") if "=" in kv)
    for k, v in component_env(s, {"PATH": "/usr/bin:/bin"}).items():
        if k != "PATH":
            assert got[k] == v, k
    assert got[
        "AIRFLOW_API_PORT"
    ] == "18080" and "airflow dags trigger babelsynth_generate" in trigger_command(s)


def test_a_busy_fixed_port_is_refused_naming_the_option(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(StackError, match=f"port {busy} is already in use.*--api-port"):
            resolve_ports(StackSettings(root=tmp_path, api_port=busy))
    free = resolve_ports(StackSettings(root=tmp_path, api_port=0, pg_port=0, teacher_port=0, llm_port=0))
    chosen = [free.api_port, free.pg_port, free.teacher_port, free.llm_port]
    assert 0 not in chosen and len(set(chosen)) == 4


def test_stop_session_stops_a_process_tree_started_detached(tmp_path):
    """A leader and its children (a shell with two sleeps, one ignoring SIGTERM) all go, by PID."""
    p = procs.spawn(
        ["bash", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"],
        dict(os.environ),
        tmp_path / "t.log",
        tmp_path,
    )
    deadline = time.monotonic() + 10
    while len(procs.session_pids(p.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(procs.session_pids(p.pid)) == 3 and procs.proc_stat(p.pid)[1] == p.pid
    t0 = time.monotonic()
    assert procs.stop_session(p.pid, grace=2) == []
    p.wait(timeout=10)
    assert procs.session_pids(p.pid) == [] and time.monotonic() - t0 < 15


def test_listening_ports_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port in procs.listening_ports()
    assert port not in procs.listening_ports()


def test_state_round_trip_and_down_without_a_stack(tmp_path):
    assert down(tmp_path / "none") == {"stopped": [], "survivors": [], "ports": []}
    s = StackSettings(root=tmp_path, placement=tmp_path / "p.yaml", api_port=1234)
    State(s, {"api-server": 999999}, 1.0, 2.5).save()
    back = read_state(tmp_path)
    assert back.settings == s and back.pids == {"api-server": 999999} and back.ready_seconds == 2.5
    assert down(tmp_path)["stopped"] == []  # a PID that no longer exists is not "stopped"
    assert read_state(tmp_path).pids == {}


def test_make_stack_runs_this_module():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^stack: .*\n\t\$\(VENV\)/bin/python -m localstack up", make, re.M)
    assert re.search(r"^stack-down:.*\n\t\$\(VENV\)/bin/python -m localstack down", make, re.M)
