"""DAG integrity and policy (Astro-style): imports cleanly, retries and tags, fast and light to parse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = (
    "torch",
    "transformers",
    "ctranslate2",
    "comet",
    "vllm",
    "pyarrow",
    "lingua",
    "lexicalrichness",
    "PIL",
)


@pytest.fixture(scope="module")
def bag():
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(bag):
    assert bag.import_errors == {}, bag.import_errors
    assert {"babelsynth_generate", "babelsynth_train"} <= set(bag.dag_ids)


def test_every_task_retries_and_every_dag_is_tagged(bag):
    for dag_id, dag in bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag_id}.{t.task_id} retries={t.retries}"


def test_the_dags_stage_list_is_the_pipelines():
    """operators/placement.py keeps its own copy of the stage order so that parsing a DAG imports no stage
    code; it must name the registered stages in their order."""
    from babelsynth.stages import STAGE_NAMES
    from operators.placement import STAGES

    assert STAGES == STAGE_NAMES


def test_generation_dag_shape(bag):
    from babelsynth.stages import STAGE_NAMES

    dag = bag.dags["babelsynth_generate"]
    ids = set(dag.task_ids)
    for stage in (*STAGE_NAMES, "write"):
        assert f"shard.{stage}" in ids
    assert {"plan", "commit", "report", "publish", "retention"} <= ids
    assert dag.catchup is False
    # the asset (what triggers training) is emitted by publish, i.e. only by a run that passed its alarms
    assert [o.name for o in dag.get_task("publish").outlets] == ["babelsynth_shards"]
    assert dag.get_task("commit").outlets == []
    assert dag.get_task("report").upstream_task_ids == {"commit"}  # commit reads metadata, report the data
    assert dag.get_task("publish").upstream_task_ids == {"report"}
    assert dag.get_task("retention").upstream_task_ids == {"publish"}
    retention = dag.get_task("retention")  # runs whatever happened, and leaves the run's state to publish
    assert retention.is_teardown and retention.trigger_rule == "all_done_setup_success"
    assert not retention.on_failure_fail_dagrun  # else publish would stop being the run's leaf


def test_training_starts_unpaused_generation_keeps_the_deployment_default(bag):
    """Paused, the Asset-scheduled training would silently never run; unpausing the generation DAG starts
    its nightly schedule, so that stays the deployer's decision (docs/airflow.md: Unpausing)."""
    assert bag.dags["babelsynth_train"].is_paused_upon_creation is False
    assert bag.dags["babelsynth_generate"].is_paused_upon_creation is None


def test_training_dag_is_scheduled_on_the_shards_asset(bag):
    dag = bag.dags["babelsynth_train"]
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert "babelsynth_shards" in str(dag.timetable.asset_condition)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_fast_without_heavy_imports(path):
    """Airflow itself is already loaded in a DAG processor: time only the DAG module's own import."""
    code = f"""
import sys, time, json
sys.path.insert(0, {str(ROOT)!r})
import airflow.sdk, airflow.models  # preloaded as in the DAG processor
import importlib.util
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("dagmod", {str(path)!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    env = {"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin"}

    env["AIRFLOW_HOME"] = os.environ["AIRFLOW_HOME"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == [], f"{path.name} imports heavy modules at parse time: {res['heavy']}"
    assert res["seconds"] < 1.0, f"{path.name} took {res['seconds']:.2f}s to parse"


def test_every_task_retries_with_exponential_backoff(bag):
    """Airflow 3 reads retry_exponential_backoff as a multiplier: True (1.0) would mean a constant delay."""
    for dag_id, dag in bag.dags.items():
        for t in dag.tasks:
            assert t.retry_exponential_backoff >= 2, f"{dag_id}.{t.task_id}"
            assert t.max_retry_delay is not None, f"{dag_id}.{t.task_id} has no max_retry_delay"


def test_nightly_schedule_from_config_catchup_off(bag, monkeypatch):
    dag = bag.dags["babelsynth_generate"]
    assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag.timetable.expression == "0 2 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    mod = _load_module(ROOT / "dags" / "babelsynth_generate.py")
    monkeypatch.setenv("BABELSYNTH_GENERATE_SCHEDULE", "30 3 * * 1-5")
    assert mod._schedule() == "30 3 * * 1-5"
    monkeypatch.setenv("BABELSYNTH_GENERATE_SCHEDULE", "none")
    assert mod._schedule() is None  # manual runs only


def _load_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_dagmod_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_stages_take_gpu_pool_slots_and_xcom_is_small(bag):
    from babelsynth.stages import STAGE_NAMES

    dag = bag.dags["babelsynth_generate"]
    for stage in STAGE_NAMES[1:]:  # every stage after ingest calls a model
        assert dag.get_task(f"shard.{stage}").pool == "gpu", stage
    for task_id in ("plan", "shard.ingest", "shard.write", "commit"):
        assert dag.get_task(task_id).pool == "default_pool", task_id
    assert bag.dags["babelsynth_train"].get_task("train_and_merge").pool == "gpu"
    from operators.tasks import compact

    stats = {
        "stage": "translate",
        "in": 10,
        "out": 9,
        "rejected": 1,
        "by_lang": {"deu_Latn": {}},
        "reasons": {},
    }
    assert compact(stats, "s3://b/r/_stages/translate/shard=00000.json.gz") == {
        "stage": "translate",
        "in": 10,
        "out": 9,
        "rejected": 1,
        "uri": "s3://b/r/_stages/translate/shard=00000.json.gz",
    }


PLACEMENT_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from airflow.models import DagBag
bag = DagBag(dag_folder={dags!r})
dag = bag.dags["babelsynth_generate"]
print(json.dumps({{"errors": {{k: str(v)[-500:] for k, v in bag.import_errors.items()}},
    "tasks": {{t.task_id: [type(t).__name__, t.pool] for t in dag.tasks}}}}))
"""


def test_placement_config_puts_stages_in_pods_and_venvs(tmp_path):
    """configs/airflow.yaml (translate, score in pods) plus recaption in a venv: the DAG's shape follows."""

    conf = tmp_path / "airflow.yaml"
    conf.write_text(
        (ROOT / "configs" / "airflow.yaml").read_text().replace("recaption: worker", "recaption: venv")
    )
    env = {**os.environ, "BABELSYNTH_AIRFLOW_CONFIG": str(conf)}
    code = PLACEMENT_PROBE.format(root=str(ROOT), dags=str(ROOT / "dags"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["errors"] == {}
    assert res["tasks"]["shard.translate"] == ["BabelsynthPodStageOperator", "gpu"]
    assert res["tasks"]["shard.score"] == ["BabelsynthPodStageOperator", "gpu"]
    assert res["tasks"]["shard.recaption"] == ["BabelsynthVenvStageOperator", "gpu"]
    assert res["tasks"]["shard.ingest"] == ["BabelsynthStageOperator", "default_pool"]


def test_bad_placement_config_fails_loudly(tmp_path):
    from operators.placement import load_placement

    bad = tmp_path / "p.yaml"
    bad.write_text("stages: {translate: gpu-box}\n")
    with pytest.raises(ValueError, match="translate"):
        load_placement(str(bad))
    bad.write_text("stages: {transl8: kubernetes}\n")
    with pytest.raises(ValueError, match="transl8"):
        load_placement(str(bad))


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def test_pod_runs_the_cli_argv_a_worker_would_run(tmp_path, sample_input, models, monkeypatch):
    """The pod spec (GPU limit, image, `babelsynth run-stage ...`) is built without a cluster; running its
    argv through the real CLI gives the stage result the in-worker path gives."""
    import gzip

    from operators import tasks
    from operators.placement import load_placement
    from operators.pod import BabelsynthPodStageOperator

    (tmp_path / "kubeconfig").write_text(KUBECONFIG)  # never contacted: only read to build the pod object
    for k, v in {
        "BABELSYNTH_WORK": str(tmp_path),
        "BABELSYNTH_MODELS": str(Path(models["nllb_ct2"]).parents[1]),  # plan checks the model files exist
        "BABELSYNTH_CONFIG": str(ROOT / "configs" / "demo.yaml"),
    }.items():
        monkeypatch.setenv(k, v)
    k8s = load_placement(str(ROOT / "configs" / "airflow.yaml")).kubernetes.model_copy(
        update={"config_path": None}
    )
    run_id = "manual__2026-11-25T02:00:00+00:00"
    params = {"input_uri": sample_input, "limit": 6, "shard_size": 3, "languages": ["deu_Latn"]}
    pod_params, worker_params = ({**params, "output_uri": str(tmp_path / name)} for name in ("pod", "worker"))

    op = BabelsynthPodStageOperator(
        task_id="ingest",
        stage="ingest",
        shard=1,
        k8s=k8s,
        pool="gpu",
        config_file=str(tmp_path / "kubeconfig"),
    )
    ctx = {"params": pod_params, "run_id": run_id}
    argv = op.argv(ctx)
    op.arguments = argv
    pod = op.build_pod_request_obj(None)
    c = pod.spec.containers[0]
    assert c.image == k8s.image and c.command == ["babelsynth"] and c.args == argv
    assert c.resources.limits["nvidia.com/gpu"] == "1" and c.resources.requests["nvidia.com/gpu"] == "1"

    for p in (pod_params, worker_params):
        tasks.plan(p, run_id)
    cli = Path(sys.executable).parent / "babelsynth"
    out = subprocess.run([str(cli), *argv], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worker = tasks.run_stage("ingest", 1, worker_params, run_id)
    assert worker["in"] == 3 and worker["uri"].startswith(str(tmp_path / "worker"))

    def rows(root: str):
        doc = json.loads(gzip.decompress(Path(root, "_stages", "ingest", "shard=00001.json.gz").read_bytes()))
        return doc["rows"], doc["rejected"]

    safe = run_id.replace(":", "_").replace("+", "_")
    assert rows(str(tmp_path / "pod" / safe)) == rows(str(tmp_path / "worker" / safe))


def test_fan_out_is_clamped_to_the_mapping_bound_whatever_the_config(tmp_path, models, monkeypatch):
    """A config allowing 1000 shards still maps at most 256 tasks per stage (shards grow instead)."""
    import pyarrow.parquet as pq

    from babelsynth.schema import to_table
    from operators import params, tasks

    src = tmp_path / "in.parquet"
    rows = [{"source_id": f"s{i}", "task_type": "vqa", "conversation": [], "images": []} for i in range(600)]
    pq.write_table(to_table("input", [{**r, "source": ""} for r in rows]), src)  # plan: footer + ids only
    models_root = str(Path(models["nllb_ct2"]).parents[1])  # plan checks the model files exist
    for k, v in {"BABELSYNTH_WORK": str(tmp_path), "BABELSYNTH_MODELS": models_root}.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "wide.yaml"
    cfg.write_text(
        (ROOT / "configs" / "demo.yaml")
        .read_text()
        .replace("shard_size: 16", "shard_size: 1\n  max_shards: 1000")
    )
    shards = tasks.plan({"config_path": str(cfg), "input_uri": str(src)}, "wide")
    assert (
        params.MAX_MAPPED == 256 and len(shards) == 200
    )  # 3 records per shard; unclamped it would be 600 tasks


def test_vllm_endpoints_from_airflow_connections_params_win(monkeypatch):
    from operators.params import run_overrides

    monkeypatch.setenv("AIRFLOW_CONN_BABELSYNTH_TEACHER", "http://:s3cret@vllm-teacher:8000/v1")
    monkeypatch.setenv("AIRFLOW_CONN_BABELSYNTH_LLM", "https://vllm-llm.example.com/v1")
    monkeypatch.delenv("BABELSYNTH_TEACHER_API_KEY", raising=False)
    over = run_overrides({"llm_url": "http://10.0.0.7:8000/v1"})
    assert over["models.teacher.base_url"] == "http://vllm-teacher:8000/v1"
    assert over["models.teacher.api_key_env"] == "BABELSYNTH_TEACHER_API_KEY"
    assert os.environ["BABELSYNTH_TEACHER_API_KEY"] == "s3cret"
    assert over["models.judge.base_url"] == over["models.rephraser.base_url"] == "http://10.0.0.7:8000/v1"
    pod = run_overrides({}, with_keys=False)  # what a pod's argv carries: URLs, never keys
    assert "models.teacher.api_key_env" not in pod and "s3cret" not in json.dumps(pod)
    assert pod["models.judge.base_url"] == "https://vllm-llm.example.com/v1"
