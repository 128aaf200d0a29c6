"""Run a stage in a Kubernetes pod of the GPU worker image: `babelsynth run-stage ...`, the CLI argv a
worker would run. Imported only when the placement config puts a stage in `kubernetes`.

Volumes (placement `kubernetes.volumes`): models and the Hugging Face cache read-only, the request cache on
the node. Endpoints reach the pod as `--set models.<role>.base_url=...` (connections or params) or as env
(`kubernetes.env`); an overridden key's ${ENV} in the config file is never expanded, so a pod needs only one.

Pools: a deferrable pod task waits in the triggerer, and by default deferred tasks hold no pool slot. So
create the GPU pool with `--include-deferred` (`airflow pools set gpu <N> "GPUs" --include-deferred`),
otherwise Airflow starts more GPU pods than the pool allows and the surplus sits Pending.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s_models

from operators.params import config_path, run_overrides
from operators.placement import KubernetesSection, PodVolume, stage_argv
from operators.tasks import check_paths


class BabelsynthPodStageOperator(KubernetesPodOperator):
    """One stage of one shard in a pod; the stage result goes to shared storage (S3), not to XCom."""

    template_fields = (*KubernetesPodOperator.template_fields, "shard")

    def __init__(self, *, stage: str, shard: Any, k8s: KubernetesSection, **kwargs):
        limits = {"cpu": k8s.cpu, "memory": k8s.memory}
        if k8s.gpus:
            limits["nvidia.com/gpu"] = str(k8s.gpus)
        super().__init__(
            name=f"babelsynth-{stage}",
            image=k8s.image,
            namespace=k8s.namespace,
            cmds=["babelsynth"],
            container_resources=_resources(limits),
            node_selector=k8s.node_selector or None,
            volumes=[_volume(v) for v in k8s.volumes] or None,
            volume_mounts=[
                k8s_models.V1VolumeMount(name=v.name, mount_path=v.mount_path, read_only=v.read_only)
                for v in k8s.volumes
            ]
            or None,
            env_vars=dict(k8s.env) or None,
            env_from=[_secret_env(s) for s in k8s.env_from_secrets] or None,
            service_account_name=k8s.service_account,
            deferrable=k8s.deferrable,
            startup_timeout_seconds=k8s.startup_timeout_seconds,
            on_finish_action="delete_succeeded_pod",
            do_xcom_push=False,
            get_logs=True,
            **kwargs,
        )
        self.stage, self.shard, self.pod_config_path = stage, shard, k8s.config_path

    def argv(self, context) -> list[str]:
        params = context["params"]
        cfg = self.pod_config_path or config_path(params)
        over = run_overrides(params, with_keys=False)  # API keys reach pods as secrets, never as argv
        return stage_argv(self.stage, int(self.shard), cfg, context["run_id"], over)

    def execute(self, context):
        check_paths(context["params"])  # a path outside the allowed roots fails without retries
        self.arguments = self.argv(context)
        return super().execute(context)


def _resources(limits: dict[str, str]):
    return k8s_models.V1ResourceRequirements(limits=limits, requests=dict(limits))


def _secret_env(name: str):
    return k8s_models.V1EnvFromSource(secret_ref=k8s_models.V1SecretEnvSource(name=name))


def _volume(v: PodVolume):
    if v.claim is not None:
        src = k8s_models.V1PersistentVolumeClaimVolumeSource(claim_name=v.claim, read_only=v.read_only)
        return k8s_models.V1Volume(name=v.name, persistent_volume_claim=src)
    return k8s_models.V1Volume(
        name=v.name, host_path=k8s_models.V1HostPathVolumeSource(path=v.host_path, type="DirectoryOrCreate")
    )
