"""A real Airflow: PostgreSQL (Debian package, private cluster on 127.0.0.1) + api-server, scheduler and
dag-processor (LocalExecutor, parallelism 2). The generation DAG is triggered through REST API v2 with
params, the training DAG must then run because of the Asset event. Every process started here is stopped
by its process group, and the teardown fails if one survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from babelsynth import storage
from tests.conftest import ROOT, WORK

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
PG_ROOT = Path("/usr/lib/postgresql")
COMPONENTS = ("api-server", "scheduler", "dag-processor")
MODEL_STAGES = ("recaption", "judge", "translate", "rephrase", "score")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    versions = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        pytest.fail(f"PostgreSQL is not installed ({PG_ROOT} missing): `make test` installs it (apt-get)")
    return versions[-1].parent


def _as_pg(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the cluster as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _session_pids(sid: int) -> list[int]:
    """Live processes of a session (the component and everything it forked: executor workers, tasks)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.fixture(scope="module")
def postgres():
    """A private cluster in a temp dir, on a free port; stopped (fast mode) and deleted afterwards."""
    pg_bin, port = _pg_bin(), _free_port()
    d = Path(tempfile.mkdtemp(prefix="pg_", dir=WORK))
    if os.geteuid() == 0:
        shutil.chown(d, "postgres", "postgres")
    data = d / "data"
    t0 = time.perf_counter()
    run = lambda cmd: subprocess.run(_as_pg(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {d} -c max_connections=100 -c fsync=off"
    run([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(d / "pg.log"), "-w", "-o", opts, "start"])
    try:
        psql = [
            str(pg_bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
        ]
        run(
            [
                *psql,
                "-c",
                "CREATE USER airflow PASSWORD 'airflow'",
                "-c",
                "CREATE DATABASE airflow OWNER airflow",
            ]
        )
        print(f"postgres up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f}s")
        yield f"postgresql+psycopg2://airflow:airflow@127.0.0.1:{port}/airflow"
    finally:
        run([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(d, ignore_errors=True)


class Stack:
    """The running Airflow: base URL, an authenticated client, the env the workers see, logs."""

    def __init__(self, url: str, home: Path, out: Path, env: dict[str, str]):
        self.url, self.home, self.out, self.env = url, home, out, env
        self.client: httpx.Client | None = None

    def login(self) -> None:
        pw = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": pw}, timeout=30)
        r.raise_for_status()
        self.client = httpx.Client(
            base_url=f"{self.url}/api/v2",
            timeout=60,
            headers={"Authorization": f"Bearer {r.json()['access_token']}"},
        )

    def get(self, path: str, **params) -> dict:
        r = self.client.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        """A task's return value as stored (JSON-native in Airflow 3)."""
        return self.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            map_index=map_index,
        )["value"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(2)
        raise AssertionError(
            f"{dag_id}/{run_id} not finished after {timeout}s: {self.states(dag_id, run_id)}"
        )

    def tis(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]

    def states(self, dag_id: str, run_id: str) -> list[tuple]:
        return sorted(
            (t["task_id"], t["map_index"], t["state"], t["try_number"]) for t in self.tis(dag_id, run_id)
        )

    def failure_logs(self, dag_id: str, run_id: str) -> str:
        """The log of every failed try, for the assertion message."""
        out = []
        for task_id, map_index, state, tries in self.states(dag_id, run_id):
            if state in ("failed", "upstream_failed", "up_for_retry") and tries:
                r = self.client.get(
                    f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{tries}",
                    params={"map_index": map_index},
                    headers={"Accept": "text/plain"},
                )
                out.append(f"--- {task_id}[{map_index}] try {tries}\n{r.text[-3000:]}")
        return "\n".join(out)


def _wait_healthy(url: str, procs: dict, home: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise AssertionError(
                    f"airflow {name} exited rc={p.returncode}:\n{_tail(home / f'{name}.log')}"
                )
        try:
            h = httpx.get(f"{url}/api/v2/monitor/health", timeout=5).json()
            if all(
                (h.get(k) or {}).get("status") == "healthy"
                for k in ("metadatabase", "scheduler", "dag_processor")
            ):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(
        "Airflow not healthy in time:\n" + "\n".join(_tail(home / f"{n}.log") for n in procs)
    )


def _ts(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"{path} missing"


def _stop(procs: dict) -> list[int]:
    """SIGTERM each component's process group, SIGKILL what is left after 20 s; returns survivors."""
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_session_pids(p.pid) for p in procs.values()):
        time.sleep(0.5)
    for p in procs.values():
        if _session_pids(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    time.sleep(0.5)
    return [pid for p in procs.values() for pid in _session_pids(p.pid)]


@pytest.fixture(scope="module")
def stack(postgres, models, vllm_servers, tmp_path_factory):
    home = Path(tempfile.mkdtemp(prefix="af_sched_", dir=WORK))
    out = tmp_path_factory.mktemp("sched_out")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    placement = home / "airflow.yaml"  # ingest runs through @task.external_python in its own interpreter
    placement.write_text(f"pool: gpu\nstages: {{ingest: venv}}\nvenv: {{python: {sys.executable}}}\n")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # dags/ import operators/; workers import babelsynth (installed editable)
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": "babelsynth-test-only",
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",  # default 5 s adds ~5 s to every task
        "PYTHONWARNINGS": "ignore",
        "BABELSYNTH_CONFIG": str(ROOT / "configs" / "demo.yaml"),
        "BABELSYNTH_TRAIN_CONFIG": str(ROOT / "configs" / "train_demo.yaml"),
        "BABELSYNTH_AIRFLOW_CONFIG": str(placement),
        "BABELSYNTH_GENERATE_SCHEDULE": "none",  # a cron would start a scheduled full-size run at deploy time
        "BABELSYNTH_WORK": str(out),
        "BABELSYNTH_MODELS": str(WORK / "models"),
        "BABELSYNTH_TEACHER_URL": vllm_servers["teacher"].url,
        "BABELSYNTH_LLM_URL": vllm_servers["llm"].url,
    }
    airflow = str(VENV_BIN / "airflow")
    t0 = time.perf_counter()
    for cmd in (["db", "migrate"], ["pools", "set", "gpu", "1", "GPU slots", "--include-deferred"]):
        r = subprocess.run([airflow, *cmd], env=env, cwd=home, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"airflow {' '.join(cmd)}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    t_migrate = time.perf_counter() - t0
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in COMPONENTS:
            with open(home / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(
                    [airflow, name],
                    env=env,
                    cwd=home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        _wait_healthy(url, procs, home)
        print(f"airflow: migrate+pool {t_migrate:.1f}s, healthy after {time.perf_counter() - t0:.1f}s")
        s = Stack(url, home, out, env)
        s.login()
        deadline = time.monotonic() + 120
        while {"babelsynth_generate", "babelsynth_train"} - {d["dag_id"] for d in s.get("/dags")["dags"]}:
            errs = s.get("/importErrors")
            assert errs["total_entries"] == 0, errs
            assert time.monotonic() < deadline, "DAGs not parsed in 120 s:\n" + _tail(
                home / "dag-processor.log"
            )
            time.sleep(1)
        print(f"airflow: DAGs parsed after {time.perf_counter() - t0:.1f}s")
        yield s
    finally:
        survivors = _stop(procs)
        shutil.rmtree(home, ignore_errors=True)
        assert not survivors, f"processes still alive after stopping Airflow: {survivors}"


def test_bad_params_are_rejected_at_trigger_time(stack):
    """The REST API validates conf against the params' JSON schema: 400 with the param named, no run."""
    before = stack.get("/dags/babelsynth_generate/dagRuns")["total_entries"]
    for conf, field in [
        ({"limit": 0}, "limit"),
        ({"languages": ["german"]}, "languages"),
        ({"max_shards": 100000}, "max_shards"),
    ]:
        r = stack.client.post("/dags/babelsynth_generate/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert f"Invalid input for param {field}" in detail, detail
        print(f"rejected {conf}: {detail[:160]}")
    assert stack.get("/dags/babelsynth_generate/dagRuns")["total_entries"] == before


def test_rest_trigger_runs_generation_then_the_asset_triggers_training(
    stack, models, vllm_servers, sample_input
):
    t0 = time.perf_counter()
    run_id = "e2e_rest_params"
    conf = {
        "input_uri": sample_input,
        "output_uri": str(stack.out / "runs"),
        "limit": 8,
        "shard_size": 4,
        "languages": ["deu_Latn", "jpn_Jpan"],
        "teacher_url": vllm_servers["teacher"].url,
        "llm_url": vllm_servers["llm"].url,
        "translator_path": models["nllb_ct2"],
        "comet_path": models["comet"],
    }
    r = stack.client.post(
        "/dags/babelsynth_generate/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf}
    )
    assert r.status_code == 200, r.text
    assert r.json()["logical_date"] is None and r.json()["run_after"]  # a manual run: no logical date

    run = stack.wait_run("babelsynth_generate", run_id, timeout=420)
    assert run["state"] == "success", (
        stack.states("babelsynth_generate", run_id),
        stack.failure_logs("babelsynth_generate", run_id),
    )
    t_gen = time.perf_counter() - t0
    states = stack.states("babelsynth_generate", run_id)
    assert {(t, i) for t, i, *_ in states if t.startswith("shard.")} == {
        (f"shard.{s}", i)
        for s in ("ingest", "recaption", "judge", "translate", "rephrase", "score", "write")
        for i in (0, 1)
    }  # 8 records / 4 per shard: two mapped shards

    # model stages took slots of the 1-slot `gpu` pool: never two at once, although parallelism is 2
    tis = stack.tis("babelsynth_generate", run_id)
    model = sorted(
        (_ts(t["start_date"]), _ts(t["end_date"]), t["task_id"], t["map_index"])
        for t in tis
        if t["task_id"].split(".")[-1] in MODEL_STAGES
    )
    assert len(model) == 10 and all(
        t["pool"] == "gpu" for t in tis if t["task_id"].split(".")[-1] in MODEL_STAGES
    )
    for a, b in zip(model, model[1:]):
        assert a[1] <= b[0], f"{a[2:]} and {b[2:]} overlapped in the 1-slot gpu pool"
    by_id = {(t["task_id"], t["map_index"]): t for t in tis}
    assert by_id[("shard.ingest", 0)]["operator"] == "BabelsynthVenvStageOperator"  # @task.external_python
    assert by_id[("shard.ingest", 0)]["pool"] == "default_pool"

    # XCom carries the manifest URI and counts; the manifest itself is on storage
    out = stack.xcom("babelsynth_generate", run_id, "commit")
    assert out["manifest_uri"] == str(stack.out / "runs" / run_id / "manifest.json")
    man = json.loads(storage.read_bytes(out["manifest_uri"]))
    assert man["reconciliation"]["ok"] and man["input_records"] == 8
    assert set(man["samples_by_lang"]) <= {"eng_Latn", "deu_Latn", "jpn_Jpan"}
    for task_id in (
        "shard.ingest",
        "shard.translate",
    ):  # the first ran via external_python, the other in the worker
        x = stack.xcom("babelsynth_generate", run_id, task_id, map_index=1)
        assert set(x) == {"shard", "stage", "in", "out", "rejected", "uri"} and x["shard"] == 1, x
        assert x["uri"].startswith(str(stack.out / "runs" / run_id / "_stages")) and os.path.exists(x["uri"])
    assert stack.xcom("babelsynth_generate", run_id, "shard.ingest", map_index=0)["in"] == 4

    # the commit's Asset event carries the manifest URI; the training DAG runs because of it
    events = stack.get("/assets/events", source_dag_id="babelsynth_generate", source_run_id=run_id)[
        "asset_events"
    ]
    assert [e["extra"]["manifest_uri"] for e in events] == [out["manifest_uri"]]
    assert events[0]["extra"]["run_after"] == run["run_after"].replace("Z", "+00:00")
    deadline, train_runs = time.monotonic() + 120, []
    while not train_runs and time.monotonic() < deadline:
        train_runs = stack.get("/dags/babelsynth_train/dagRuns")["dag_runs"]
        time.sleep(2)
    assert len(train_runs) == 1 and train_runs[0]["run_type"] == "asset_triggered", train_runs
    tr = stack.wait_run("babelsynth_train", train_runs[0]["dag_run_id"], timeout=420)
    assert tr["state"] == "success", (
        stack.states("babelsynth_train", tr["dag_run_id"]),
        stack.failure_logs("babelsynth_train", tr["dag_run_id"]),
    )
    assert stack.xcom("babelsynth_train", tr["dag_run_id"], "manifest_uri") == out["manifest_uri"]
    res = stack.xcom("babelsynth_train", tr["dag_run_id"], "train_and_merge")
    ev = json.loads(Path(res["eval_json"]).read_text())
    assert {"sft", "merged"} <= set(ev["models"])
    print(f"generation {t_gen:.1f}s, generation + training {time.perf_counter() - t0:.1f}s")
