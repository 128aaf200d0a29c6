"""A real Airflow, brought up by `make stack`'s own code path (`python -m localstack up`): PostgreSQL,
api-server, scheduler (LocalExecutor, parallelism 2), dag-processor, triggerer and the two tiny vLLM
servers, on free ports. It is driven with the official client, `apache-airflow-client`: the client
script of docs/airflow.md runs a generation and the training its Asset event starts. `localstack down`
must then leave no process and no listening port.

The tests share one stack and run in file order; the last one brings it down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from babelsynth import storage
from babelsynth.stages import STAGE_NAMES
from localstack import procs
from localstack.settings import DEMO_CONF, site_values, trigger_command
from localstack.stack import password, read_state, token
from tests.conftest import ROOT, TEST_ROOTS, WORK
from tests.test_airflow_docs import clean_env, doc_blocks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]  # a generation + training on a busy 2-core box

MODEL_STAGES = STAGE_NAMES[1:]  # every stage after ingest calls a model
SERVICES = ("postgres", "vllm-teacher", "vllm-llm", "api-server", "scheduler", "dag-processor", "triggerer")
RUNS: dict[str, str] = {}  # what the client script ran: generation and training run ids


def localstack(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localstack", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack(models):
    root = Path(tempfile.mkdtemp(prefix="stack_", dir=WORK))
    placement = root / "airflow.yaml"  # ingest runs through @task.external_python in its own interpreter
    roots = json.dumps(dict.fromkeys(("config", "input", "output", "models"), TEST_ROOTS))
    placement.write_text(
        f"pool: gpu\nstages: {{ingest: venv}}\nvenv: {{python: {sys.executable}}}\nallowed_roots: {roots}\n"
    )
    ports = [
        a for opt in ("api", "pg", "teacher", "llm", "log", "trigger-log") for a in (f"--{opt}-port", "0")
    ]
    t0 = time.perf_counter()
    up = localstack(
        "up", "--root", str(root), "--models", str(WORK / "models"), *ports, "--placement", str(placement)
    )
    try:
        assert up.returncode == 0, up.stdout[-5000:] + up.stderr[-5000:]
        state = read_state(root)
        print(f"stack up in {time.perf_counter() - t0:.1f}s\n{up.stdout}")
        yield state, up.stdout
    finally:
        localstack("down", "--root", str(root), timeout=300)  # a no-op once the last test brought it down
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(stack):
    import airflow_client.client as af

    s = stack[0].settings
    with af.ApiClient(af.Configuration(host=s.api_url, access_token=token(s))) as api:
        yield api


def test_up_prints_the_ui_the_login_and_the_trigger_command(stack):
    state, out = stack
    s = state.settings
    assert f"UI       {s.api_url}" in out
    assert f"login    admin / {password(s)}" in out and str(s.home / "simple_auth_manager_passwords") in out
    assert f"trigger  {trigger_command(s)}" in out and f"health   {s.api_url}/api/v2/monitor/health" in out
    assert set(state.pids) == set(SERVICES)
    for name, pid in state.pids.items():
        assert procs.alive(pid), name
        if name != "postgres":
            assert procs.proc_stat(pid)[1] == pid, f"{name} is not the leader of its own session"
        assert (s.logs / f"{name}.log").stat().st_size > 0, f"no log for {name} in {s.logs}"
    print(f"ready after {state.ready_seconds}s")


def test_every_service_is_healthy_and_both_dags_are_unpaused(stack, client):
    import airflow_client.client as af

    s = stack[0].settings
    health = af.MonitorApi(client).get_health()
    for component in ("metadatabase", "scheduler", "dag_processor", "triggerer"):
        assert getattr(health, component).status == "healthy", health
    for url in (s.teacher_url, s.llm_url):
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    dags = af.DAGApi(client)
    assert dags.get_dag("babelsynth_generate").is_paused is False  # unpaused by make stack, as the docs do
    assert dags.get_dag("babelsynth_train").is_paused is False  # nobody unpaused it: its creation default


def test_bad_params_are_rejected_at_trigger_time(client):
    """The API validates conf against the params' JSON schema: 400 with the param named, no run."""
    import airflow_client.client as af
    from airflow_client.client.exceptions import BadRequestException

    runs = af.DagRunApi(client)
    before = runs.get_dag_runs("babelsynth_generate").total_entries
    for conf, field in [
        ({"limit": 0}, "limit"),
        ({"languages": ["german"]}, "languages"),
        ({"max_shards": 100000}, "max_shards"),
    ]:
        with pytest.raises(BadRequestException) as e:
            runs.trigger_dag_run("babelsynth_generate", af.TriggerDAGRunPostBody(conf=conf))
        assert e.value.status == 400 and f"Invalid input for param {field}" in e.value.body, e.value.body
    assert runs.get_dag_runs("babelsynth_generate").total_entries == before


def wait_run(client, dag_id: str, run_id: str, timeout: float):
    import airflow_client.client as af

    runs = af.DagRunApi(client)
    deadline = time.monotonic() + timeout
    while (run := runs.get_dag_run(dag_id, run_id)).state.value not in ("success", "failed"):
        assert time.monotonic() < deadline, (
            f"{dag_id}/{run_id} not finished after {timeout}s: {states(client, dag_id, run_id)}"
        )
        time.sleep(3)
    return run


def tis(client, dag_id: str, run_id: str) -> list:
    import airflow_client.client as af

    return af.TaskInstanceApi(client).get_task_instances(dag_id, run_id, limit=1000).task_instances


def states(client, dag_id: str, run_id: str) -> list[tuple]:
    return sorted(
        (t.task_id, t.map_index, t.state.value if t.state else None, t.try_number)
        for t in tis(client, dag_id, run_id)
    )


def task_log(s, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
    d = s.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    if map_index >= 0:
        d = d / f"map_index={map_index}"
    return (d / f"attempt={try_number}.log").read_text()


def test_a_configuration_error_fails_plan_at_once_without_retries(stack, client, tmp_path):
    """An unset variable in the config: plan fails at its first try (no retry), naming the variable."""
    import airflow_client.client as af

    s = stack[0].settings
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "configs" / "demo.yaml")
        .read_text()
        .replace("${BABELSYNTH_WORK}/output", "${BABELSYNTH_NOT_SET_HERE}/out")
    )
    t0 = time.perf_counter()
    run = af.DagRunApi(client).trigger_dag_run(
        "babelsynth_generate", af.TriggerDAGRunPostBody(conf={"config_path": str(bad)})
    )
    done = wait_run(client, "babelsynth_generate", run.dag_run_id, timeout=600)
    assert done.state.value == "failed"
    by_id = {(t, i): (st, n) for t, i, st, n in states(client, "babelsynth_generate", run.dag_run_id)}
    assert by_id[("plan", -1)] == ("failed", 1), by_id  # not up_for_retry: retries are for transient faults
    assert by_id[("commit", -1)][0] == "upstream_failed"
    log = task_log(s, "babelsynth_generate", run.dag_run_id, "plan", 1)
    assert "configuration error, not retried" in log and "BABELSYNTH_NOT_SET_HERE is not set" in log
    print(f"config error: run failed after {time.perf_counter() - t0:.1f}s")


def ts(value) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def test_the_docs_client_script_runs_generation_then_the_asset_triggered_training(stack, client):
    """docs/airflow.md's Python client block, run literally: trigger, poll, XCom, then the training run."""
    import airflow_client.client as af

    s = stack[0].settings
    code = doc_blocks()["client"][1]
    env = {**clean_env(), **site_values(s)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    took = time.perf_counter() - t0
    printed = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    gen_id, gen_state = printed["generation"].rsplit(" ", 1)
    train_id, train_state = printed["training"].rsplit(" ", 1)
    RUNS.update(generation=gen_id, training=train_id)
    assert gen_state == "success", states(client, "babelsynth_generate", gen_id)
    assert train_state == "success", states(client, "babelsynth_train", train_id)

    # 12 records, 6 per shard: two mapped shards through every stage
    all_tis = tis(client, "babelsynth_generate", gen_id)
    shard_tis = {(t.task_id, t.map_index) for t in all_tis if t.task_id.startswith("shard.")}
    stages = (*STAGE_NAMES, "write")
    assert shard_tis == {(f"shard.{st}", i) for st in stages for i in (0, 1)}

    # model stages took slots of the 1-slot `gpu` pool: never two at once, although parallelism is 2
    model = sorted(
        (ts(t.start_date), ts(t.end_date), t.task_id, t.map_index)
        for t in all_tis
        if t.task_id.split(".")[-1] in MODEL_STAGES
    )
    assert len(model) == 2 * len(MODEL_STAGES) and all(
        t.pool == "gpu" for t in all_tis if t.task_id.split(".")[-1] in MODEL_STAGES
    )
    for a, b in zip(model, model[1:]):
        assert a[1] <= b[0], f"{a[2:]} and {b[2:]} overlapped in the 1-slot gpu pool"
    by_id = {(t.task_id, t.map_index): t for t in all_tis}
    assert by_id[("shard.ingest", 0)].operator == "BabelsynthVenvStageOperator"  # @task.external_python
    assert by_id[("shard.ingest", 0)].pool == "default_pool"

    # XCom carries the manifest URI and counts; the manifest itself is on storage
    xcoms = af.XComApi(client)

    def xcom(dag_id, run_id, task_id, map_index=-1):
        return xcoms.get_xcom_entry(
            dag_id, task_id, run_id, "return_value", map_index=map_index
        ).actual_instance.value

    out = xcom("babelsynth_generate", gen_id, "commit")
    assert out["manifest_uri"] == printed["manifest"] and out["run_id"] == gen_id
    assert out["manifest_uri"].startswith(f"{s.work / 'output'}/") and out["manifest_uri"].endswith(
        "/manifest.json"
    )
    man = json.loads(storage.read_bytes(out["manifest_uri"]))
    assert man["reconciliation"]["ok"] and man["input_records"] == 12
    assert set(man["samples_by_lang"]) <= {"eng_Latn", "deu_Latn", "jpn_Jpan"}
    for task_id in (
        "shard.ingest",
        "shard.translate",
    ):  # the first ran via external_python, the other in the worker
        x = xcom("babelsynth_generate", gen_id, task_id, map_index=1)
        assert set(x) == {"shard", "stage", "in", "out", "rejected", "uri"} and x["shard"] == 1, x
        assert os.path.exists(x["uri"]), x
    assert xcom("babelsynth_generate", gen_id, "shard.ingest", map_index=0)["in"] == 6

    # the commit's Asset event carries the manifest URI; the training run came from it
    events = (
        af.AssetApi(client)
        .get_asset_events(source_dag_id="babelsynth_generate", source_run_id=gen_id)
        .asset_events
    )
    assert [e.extra["manifest_uri"] for e in events] == [out["manifest_uri"]]
    train = af.DagRunApi(client).get_dag_run("babelsynth_train", train_id)
    assert train.run_type.value == "asset_triggered"
    assert xcom("babelsynth_train", train_id, "manifest_uri") == out["manifest_uri"]
    res = xcom("babelsynth_train", train_id, "train_and_merge")
    assert res["eval_json"] == printed["eval"]
    assert {"sft", "merged"} <= set(json.loads(Path(res["eval_json"]).read_text())["models"])
    print(f"client script: generation + training in {took:.1f}s")


def test_task_logs_have_no_error_lines_and_no_noise_that_was_fixed(stack):
    """Expected conditions log no error-level line; the JWT key-length warning and the image-processor
    notice (fixed at their source) appear nowhere."""
    s = stack[0].settings
    assert set(RUNS) == {"generation", "training"}, "the client-script test did not run"
    files = [
        *(s.home / "logs" / "dag_id=babelsynth_generate" / f"run_id={RUNS['generation']}").rglob("*.log"),
        *(s.home / "logs" / "dag_id=babelsynth_train" / f"run_id={RUNS['training']}").rglob("*.log"),
    ]
    assert len(files) >= 2 + 14 + 2, files
    bad = []
    for f in files:
        for line in f.read_text().splitlines():
            rec = json.loads(line)  # task logs are JSON lines
            if rec.get("level") in ("error", "critical"):
                bad.append(
                    f"{f.relative_to(s.home / 'logs')}: {rec.get('logger')}: {str(rec.get('event'))[:300]}"
                )
    assert not bad, "\n".join(bad)
    everything = [*files, *s.logs.glob("*.log")]
    for f in everything:
        text = f.read_text(errors="replace")
        assert "InsecureKeyLengthWarning" not in text, f
        assert "slow image processor" not in text, f


def test_the_printed_trigger_command_creates_a_run(stack, client):
    """Run literally (the DAG paused meanwhile, so the run is created but never starts), then deleted."""
    import airflow_client.client as af

    s = stack[0].settings
    dags, runs = af.DAGApi(client), af.DagRunApi(client)
    dags.patch_dag("babelsynth_generate", af.DAGPatchBody(is_paused=True))
    try:
        before = {r.dag_run_id for r in runs.get_dag_runs("babelsynth_generate").dag_runs}
        r = subprocess.run(
            ["bash", "-c", trigger_command(s)], env=clean_env(), capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        new = [x for x in runs.get_dag_runs("babelsynth_generate").dag_runs if x.dag_run_id not in before]
        assert len(new) == 1 and new[0].conf == DEMO_CONF and new[0].state.value == "queued", new
        runs.delete_dag_run("babelsynth_generate", new[0].dag_run_id)
    finally:
        dags.patch_dag("babelsynth_generate", af.DAGPatchBody(is_paused=False))


def test_stack_down_leaves_no_process_and_no_port(stack):
    state = stack[0]
    t0 = time.perf_counter()
    r = localstack("down", "--root", str(state.settings.root), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "babelsynth stack is down" in r.stdout
    for name, pid in state.pids.items():
        left = [pid] if name == "postgres" and procs.alive(pid) else procs.session_pids(pid)
        assert not left, f"{name} left {left}"
    ports = set(state.settings.ports.values()) & procs.listening_ports()
    assert not ports, f"still listening: {ports}"
    assert re.search(r"stopped postgres", r.stdout)
    print(f"stack down in {time.perf_counter() - t0:.1f}s\n{r.stdout}")
