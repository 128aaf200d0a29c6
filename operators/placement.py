"""Where each generation stage runs: in the Airflow worker, in another venv, or in a Kubernetes pod.

The DAG's shape depends on it (which operator each stage task is), so it is deployment config read by the
DAG processor at parse time from $BABELSYNTH_AIRFLOW_CONFIG (YAML, see configs/airflow.yaml), not a run
param. The same file holds `allowed_roots`, where path params may point (operators/boundary.py).
Only pyyaml and pydantic are imported: both ship with Airflow, so parsing stays fast.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.boundary import AllowedRoots

STAGES = (
    "ingest",
    "safety_pre",
    "recaption",
    "safety_post",
    "judge",
    "translate",
    "rephrase",
    "output_safety",
    "score",
)
Where = Literal["worker", "venv", "kubernetes"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VenvSection(_Base):
    """@task.external_python: a Python with babelsynth installed (e.g. the vLLM venv for offline vLLM)."""

    python: str = Field("/opt/venv-vllm/bin/python", description="interpreter that runs the stage")


class PodVolume(_Base):
    """A volume every stage pod mounts: a PersistentVolumeClaim or a directory of the node (hostPath)."""

    name: str
    mount_path: str
    claim: str | None = Field(None, description="PersistentVolumeClaim name")
    host_path: str | None = Field(None, description="node directory (created if missing)")
    read_only: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> PodVolume:
        if (self.claim is None) == (self.host_path is None):
            raise ValueError(f"pod volume {self.name!r}: set exactly one of claim or host_path")
        return self


def _default_volumes() -> list[PodVolume]:
    """Models and the HF cache (COMET's encoder files) read-only from claims; the request cache on the node:
    SQLite in WAL mode needs a local filesystem, and pods on one node share it."""
    return [
        PodVolume(name="models", mount_path="/models", claim="babelsynth-models", read_only=True),
        PodVolume(name="hf-home", mount_path="/opt/hf-home", claim="babelsynth-hf-home", read_only=True),
        PodVolume(name="cache", mount_path="/var/cache/babelsynth", host_path="/var/cache/babelsynth"),
    ]


class KubernetesSection(_Base):
    """KubernetesPodOperator running `babelsynth run-stage ...` in the GPU worker image.

    One GPU per pod (`gpus`, the device plugin narrows CUDA_VISIBLE_DEVICES to it); the image's HF_HOME and
    BABELSYNTH_CACHE_DIR point into `volumes`, and configs/production.yaml's model paths into /models."""

    image: str = "babelsynth-worker-gpu:0.1.0"
    namespace: str = "airflow"
    gpus: int = Field(
        1, ge=0, le=1, description="nvidia.com/gpu limit per pod: one per stage task (COMET runs on one)"
    )
    cpu: str = "4"
    memory: str = "32Gi"
    deferrable: bool = Field(
        True, description="wait in the triggerer: frees the worker slot (see pool notes)"
    )
    config_path: str | None = Field(None, description="config path inside the image; default: the run's")
    service_account: str | None = None
    env: dict[str, str] = Field(
        default_factory=dict, description="plain env vars (e.g. BABELSYNTH_S3_ENDPOINT_URL)"
    )
    env_from_secrets: list[str] = Field(
        default_factory=list, description="k8s secrets exported as env (S3 keys)"
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    volumes: list[PodVolume] = Field(default_factory=_default_volumes)
    startup_timeout_seconds: int = Field(
        600, ge=30, description="a pod Pending longer than this fails the try"
    )


class TrainKubernetesSection(_Base):
    """KubernetesPodOperator running `torchrun ... -m babelsynth.cli train ...` in one multi-GPU pod.

    The GPU count is the recipe's `resources.nproc_per_node`, read when the task runs."""

    image: str = "babelsynth-worker-gpu:0.1.0"
    namespace: str = "airflow"
    cpu: str = "32"
    memory: str = "512Gi"
    shm_size: str = Field(
        "64Gi", description="/dev/shm (memory-backed emptyDir): NCCL and dataloaders need it"
    )
    models_claim: str = Field("babelsynth-models", description="PVC with the checkpoints, mounted read-only")
    models_mount: str = "/models"
    scratch_size: str = Field("2Ti", description="node-local emptyDir for checkpoints before upload")
    scratch_mount: str = "/scratch"
    configs_dir: str | None = Field(
        None,
        description="recipes dir inside the image (run's train_config by file name); default: same path",
    )
    deferrable: bool = True
    service_account: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    env_from_secrets: list[str] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    startup_timeout_seconds: int = Field(1800, ge=30)


class TrainPlacement(_Base):
    """Where babelsynth_train's training task runs: `worker` (torchrun beside the Airflow worker, e.g. a
    LocalExecutor on a GPU box) or `kubernetes` (one pod with the recipe's GPU count)."""

    where: Literal["worker", "kubernetes"] = "worker"
    pool_slots: int = Field(1, ge=1, description="gpu-pool slots the training task holds (its GPU count)")
    kubernetes: TrainKubernetesSection = TrainKubernetesSection()


class Placement(_Base):
    pool: str = Field("gpu", description="model stages take slots from this pool")
    pool_slots: int = Field(1, ge=1)
    model_stages: list[str] = Field(default_factory=lambda: list(STAGES[1:]))
    stages: dict[str, Where] = Field(default_factory=dict, description="stage -> where; unlisted: worker")
    venv: VenvSection = VenvSection()
    kubernetes: KubernetesSection = KubernetesSection()
    train: TrainPlacement = TrainPlacement()
    allowed_roots: AllowedRoots = Field(
        default_factory=AllowedRoots, description="where path params may point (operators/boundary.py)"
    )

    def where(self, stage: str) -> Where:
        return self.stages.get(stage, "worker")

    def pool_for(self, stage: str) -> str | None:
        return self.pool if stage in self.model_stages else None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) in os.environ:
            return os.environ[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise ValueError(f"airflow placement config references ${{{m.group(1)}}} but it is not set")

    return _ENV.sub(sub, text)


def load_placement(path: str | None = None) -> Placement:
    """$BABELSYNTH_AIRFLOW_CONFIG if set (it must exist), else defaults: every stage in the worker."""
    path = path or os.environ.get("BABELSYNTH_AIRFLOW_CONFIG")
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"BABELSYNTH_AIRFLOW_CONFIG={path} does not exist")
        data = yaml.safe_load(_expand(p.read_text())) or {}
    placement = Placement.model_validate(data)
    unknown = (set(placement.stages) | set(placement.model_stages)) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)} in the placement config; stages are {STAGES}")
    if os.environ.get("BABELSYNTH_MODEL_POOL"):
        placement.pool = os.environ["BABELSYNTH_MODEL_POOL"]
    return placement


def stage_argv(stage: str, shard: int, config_path: str, run_id: str, overrides: dict[str, Any]) -> list[str]:
    """The `babelsynth` CLI arguments that run one stage of one shard: what a pod runs."""
    argv = [
        "run-stage",
        "--config",
        config_path,
        "--run-id",
        run_id,
        "--stage",
        stage,
        "--shard",
        str(int(shard)),
    ]
    for k, v in sorted(overrides.items()):
        argv += ["--set", f"{k}={json.dumps(v)}"]
    return argv
