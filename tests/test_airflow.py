"""The generation and training DAGs run for real under Airflow (dag.test, SQLite metadata DB)."""

import json
import os

import pytest

from babelsynth import storage
from tests.conftest import ROOT, WORK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_db():
    from airflow.utils import db

    db.resetdb()


@pytest.fixture(scope="module")
def bag(airflow_db):
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def af_env(models, vllm_servers, sample_input, tmp_path_factory):
    """Env the DAG tasks read: the config path and what the demo config expands."""
    out = tmp_path_factory.mktemp("af_out")
    env = {
        "BABELSYNTH_CONFIG": str(ROOT / "configs" / "demo.yaml"),
        "BABELSYNTH_TRAIN_CONFIG": str(ROOT / "configs" / "train_demo.yaml"),
        "BABELSYNTH_WORK": str(out),
        "BABELSYNTH_MODELS": str(WORK / "models"),
        "BABELSYNTH_TEACHER_URL": vllm_servers["teacher"].url,
        "BABELSYNTH_LLM_URL": vllm_servers["llm"].url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"out": out, "input": sample_input}
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _tis(dr):
    return [(ti.task_id, ti.map_index, ti.state) for ti in dr.get_task_instances()]


def test_generate_then_train_from_the_manifest(bag, af_env):
    conf = {"input_uri": af_env["input"], "limit": 10, "shard_size": 4, "languages": ["deu_Latn", "kor_Hang"]}
    dr = bag.get_dag("babelsynth_generate").test(run_conf=conf)
    assert dr.state == "success", _tis(dr)
    tis = {(t.task_id, t.map_index): t for t in dr.get_task_instances()}
    assert sorted(i for (tid, i) in tis if tid == "shard.translate") == [0, 1, 2]  # 10 records / 4 per shard
    out = tis[("commit", -1)].xcom_pull(task_ids="commit")
    man = json.loads(storage.read_bytes(out["manifest_uri"]))
    assert man["reconciliation"]["ok"] and man["input_records"] == 10
    assert (
        set(man["samples_by_lang"]) <= {"eng_Latn", "deu_Latn", "kor_Hang"}
        and "eng_Latn" in man["samples_by_lang"]
    )

    tr = bag.get_dag("babelsynth_train").test(run_conf={"manifest_uri": out["manifest_uri"]})
    assert tr.state == "success", _tis(tr)
    res = {t.task_id: t for t in tr.get_task_instances()}["train_and_merge"].xcom_pull(
        task_ids="train_and_merge"
    )
    ev = json.loads(storage.read_bytes(res["eval_json"]))
    assert {"sft", "merged"} <= set(ev["models"]) and storage.exists(res["merged"]["uri"] + "/merge.json")


def test_fan_out_stays_within_the_mapping_bound(bag, af_env):
    """30 records with shard_size 1 would be 30 tasks per stage; max_shards=4 caps the fan-out at 4."""
    conf = {
        "input_uri": af_env["input"],
        "limit": 30,
        "shard_size": 1,
        "max_shards": 4,
        "languages": ["ita_Latn"],
    }
    dr = bag.get_dag("babelsynth_generate").test(run_conf=conf)
    assert dr.state == "success", _tis(dr)
    mapped = {i for (tid, i, _) in _tis(dr) if tid == "shard.ingest"}
    assert mapped == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "conf,field",
    [
        ({"limit": 0}, "limit"),
        ({"languages": ["german"]}, "languages"),
        ({"max_shards": 100000}, "max_shards"),
    ],
)
def test_bad_params_are_rejected_at_trigger_time(bag, conf, field):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=field):
        bag.get_dag("babelsynth_generate").test(run_conf=conf)
