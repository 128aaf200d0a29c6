"""babelsynth_train's training task: no demo fallback, the same argv in a worker and in a multi-GPU pod,
and the whole DAG against an S3 output URI on a real S3-protocol server (moto's), torchrun 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.proxies import moto_s3
from tests.train_helpers import build_fake_run

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
vlm_dir: {models}/aya_vision/vlm
text_dir: {models}/aya_vision/llm
train:
  phases:
    alignment: {{steps: 2, warmup_steps: 1, batch_size: 2, max_seq_len: 128, lr: 1.0e-3}}
    sft: {{steps: 2, warmup_steps: 1, batch_size: 2, max_seq_len: 128, lr: 1.0e-3, packing: true}}
  merge: {{alpha: 0.4, sweep: [0.5]}}
  eval: {{heldout_fraction: 0.2, max_batches: 1, batch_size: 4}}
  resources: {{nproc_per_node: {nproc}, gpu_memory_gib: 4}}
  checkpoint_every: 1
  device: cpu
"""


def _recipe(tmp: Path, models_root: str | Path, nproc: int) -> Path:
    p = tmp / f"recipe{nproc}.yaml"
    p.write_text(RECIPE.format(models=models_root, nproc=nproc))
    return p


def test_a_missing_training_config_is_an_error_not_the_demo_recipe(monkeypatch, tmp_path):
    from operators.train_launch import train_config

    monkeypatch.delenv("BABELSYNTH_TRAIN_CONFIG", raising=False)
    with pytest.raises(ValueError, match=r"no training recipe: pass the `train_config` param or set"):
        train_config({})
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        train_config({"train_config": str(tmp_path / "nope.yaml")})
    monkeypatch.setenv("BABELSYNTH_TRAIN_CONFIG", str(tmp_path / "env.yaml"))
    (tmp_path / "env.yaml").write_text("{}")
    assert train_config({}) == str(tmp_path / "env.yaml")
    assert train_config({"train_config": str(ROOT / "configs" / "train_demo.yaml")}).endswith(
        "train_demo.yaml"
    )


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def test_pod_and_worker_run_the_same_train_argv_under_torchrun(tmp_path, monkeypatch):
    """The pod spec is built without a cluster: torchrun with the recipe's GPU count, the GPU limit,
    a memory-backed /dev/shm, the model volume read-only and scratch; its babelsynth argv is the worker's."""
    from operators.placement import load_placement
    from operators.train_launch import prepare, torchrun_args
    from operators.train_pod import BabelsynthTrainPodOperator

    monkeypatch.setenv("BABELSYNTH_MODELS", "/models")
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)  # never contacted
    k8s_conf = load_placement(str(ROOT / "configs" / "airflow.yaml")).train.kubernetes
    recipe = str(ROOT / "configs" / "train_aya_vision_8b.yaml")
    params = {"train_config": recipe, "out_uri": None}
    manifest = "s3://bucket/runs/r1/manifest.json"
    op = BabelsynthTrainPodOperator(
        task_id="train_and_merge",
        manifest_uri=manifest,
        k8s_conf=k8s_conf,
        config_file=str(tmp_path / "kubeconfig"),
    )
    launch = op.launch({"params": params})
    pod = op.build_pod_request_obj(None)
    c = pod.spec.containers[0]
    in_pod = "/opt/babelsynth/configs/train_aya_vision_8b.yaml"
    assert c.command == ["torchrun"]
    assert c.args == [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        "-m",
        "babelsynth.cli",
        "train",
        "--manifest",
        manifest,
        "--recipe",
        in_pod,
        "--out",
        "s3://bucket/runs/r1/training",
    ]
    assert c.resources.limits["nvidia.com/gpu"] == "8" == c.resources.requests["nvidia.com/gpu"]
    vols = {v.name: v for v in pod.spec.volumes}
    mounts = {m.name: m for m in c.volume_mounts}
    assert vols["dshm"].empty_dir.medium == "Memory" and mounts["dshm"].mount_path == "/dev/shm"
    assert vols["models"].persistent_volume_claim.claim_name == k8s_conf.models_claim
    assert mounts["models"].read_only and mounts["models"].mount_path == "/models"
    env = {e.name: e.value for e in c.env}
    assert env["BABELSYNTH_TRAIN_SCRATCH"] == mounts["scratch"].mount_path
    worker = prepare(manifest, params)  # what the worker placement runs
    assert worker.nproc == launch.nproc == 8 and worker.out_uri == launch.out_uri
    assert [a if a != recipe else in_pod for a in worker.argv] == launch.argv
    assert c.args == torchrun_args(8, launch.argv)


PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from airflow.models import DagBag
bag = DagBag(dag_folder={dags!r})
t = bag.dags["babelsynth_train"].get_task("train_and_merge")
print(json.dumps({{"errors": {{k: str(v)[-500:] for k, v in bag.import_errors.items()}},
    "task": [type(t).__name__, t.pool, t.pool_slots]}}))
"""


def test_placement_puts_training_in_a_pod_holding_its_gpus():
    env = {
        **os.environ,
        "BABELSYNTH_AIRFLOW_CONFIG": str(ROOT / "configs" / "airflow.yaml"),
        "PYTHONWARNINGS": "ignore",
    }
    code = PROBE.format(root=str(ROOT), dags=str(ROOT / "dags"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["errors"] == {} and res["task"] == ["BabelsynthTrainPodOperator", "gpu", 8]


# ------------------------------------------------------------------------------------------ S3, for real
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server speaks the S3 wire protocol; boto3 (and the torchrun children) talk HTTP to it."""
    with moto_s3("babelsynth") as (_, client):
        yield client


def _upload_run(s3, local: Path, prefix: str) -> str:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(f), "babelsynth", f"{prefix}/{f.relative_to(local)}")
    return f"s3://babelsynth/{prefix}/manifest.json"


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="babelsynth", Prefix=prefix)
    return {o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def bag():
    from airflow.models import DagBag
    from airflow.utils import db

    db.resetdb()
    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.mark.slow
def test_training_dag_writes_merged_model_and_eval_to_s3(bag, s3, models, tmp_path, monkeypatch):
    """The run lives on S3, so its training output goes next to it on S3: torchrun with 2 processes
    writes checkpoints to local scratch and uploads them; merged model and eval.json land on S3. A second
    trigger on a fresh node (new scratch) trains nothing again: it reads the phases back from S3."""
    manifest = _upload_run(s3, build_fake_run(tmp_path / "run"), "runs/r1")
    recipe = _recipe(tmp_path, Path(models["vlm"]).parents[1], nproc=2)
    monkeypatch.setenv("BABELSYNTH_TRAIN_CONFIG", str(recipe))
    monkeypatch.setenv("BABELSYNTH_TRAIN_SCRATCH", str(tmp_path / "scratch1"))
    dr = bag.get_dag("babelsynth_train").test(run_conf={"manifest_uri": manifest})
    tis = {t.task_id: t for t in dr.get_task_instances()}
    assert dr.state == "success", [(t.task_id, t.state) for t in tis.values()]
    res = tis["train_and_merge"].xcom_pull(task_ids="train_and_merge")
    assert res["out_uri"] == "s3://babelsynth/runs/r1/training" and res["world"] == 2

    keys = _keys(s3, "runs/r1/training/")
    for k in (
        "merged/model.safetensors",
        "merged/merge.json",
        "merged/config.json",
        "eval.json",
        "summary.json",
        "alignment/phase_result.json",
        "sft/model.safetensors",
        "checkpoints/sft/step-0000002/trainer_state.json",
        "checkpoints/sft/step-0000002/.metadata",
        "checkpoints/sft/step-0000002/__1_0.distcp",
    ):
        assert k in keys, (k, sorted(keys))
    assert not [k for k in keys if k.startswith("merged_a")]  # the sweep was scored in memory
    ev = json.loads(s3.get_object(Bucket="babelsynth", Key="runs/r1/training/eval.json")["Body"].read())
    assert set(ev["models"]) == {"text_base", "sft", "merged"} and set(ev["sweep"]) == {"0.50"}
    assert set(ev["skipped_for_length"]) >= {"alignment", "sft"} and ev["models"]["merged"]["mm_loss"] > 0
    merged = json.loads(
        s3.get_object(Bucket="babelsynth", Key="runs/r1/training/merged/merge.json")["Body"].read()
    )
    assert merged["alpha"] == 0.4 and merged["dtype"] == "bfloat16"

    # a retry elsewhere: empty scratch, the sft phase's marker gone but its checkpoints uploaded
    s3.delete_object(Bucket="babelsynth", Key="runs/r1/training/sft/phase_result.json")
    monkeypatch.setenv("BABELSYNTH_TRAIN_SCRATCH", str(tmp_path / "scratch2"))
    dr2 = bag.get_dag("babelsynth_train").test(run_conf={"manifest_uri": manifest})
    assert dr2.state == "success"
    again = {t.task_id: t for t in dr2.get_task_instances()}["train_and_merge"].xcom_pull(
        task_ids="train_and_merge"
    )
    assert again["phases"]["alignment"]["ran"] == 0  # read back from S3
    assert again["phases"]["sft"]["resumed_from"] == 2 and again["phases"]["sft"]["ran"] == 0
    assert again["eval"] == res["eval"]


def test_training_task_without_a_recipe_fails(monkeypatch, tmp_path):
    """The DAG's task itself (its callable, as the worker runs it): no param, no env -> an error."""
    from airflow.models import DagBag

    monkeypatch.delenv("BABELSYNTH_TRAIN_CONFIG", raising=False)
    task = DagBag(dag_folder=str(ROOT / "dags")).dags["babelsynth_train"].get_task("train_and_merge")
    with pytest.raises(ValueError, match="no training recipe"):
        task.python_callable(str(tmp_path / "manifest.json"), params={"train_config": None})
