"""babelsynth_train's training task as one multi-GPU Kubernetes pod: `torchrun ... -m babelsynth.cli train`.

Imported only when the placement config says `train: {where: kubernetes}`. The pod gets the recipe's GPU
count (`resources.nproc_per_node`, read when the task runs), a memory-backed /dev/shm (NCCL and PyTorch
need more than the 64 MB container default), the model volume read-only and a node-local scratch volume
for checkpoints before they are uploaded to the run's output URI.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from operators.placement import TrainKubernetesSection
from operators.tasks import check_paths
from operators.train_launch import Launch, prepare, read_summary, torchrun_args, train_config


class BabelsynthTrainPodOperator(KubernetesPodOperator):
    """Training (all phases, merge, eval) in one pod; the summary is read back from the output URI."""

    template_fields = (*KubernetesPodOperator.template_fields, "manifest_uri")

    def __init__(self, *, manifest_uri: Any, k8s_conf: TrainKubernetesSection, **kwargs):
        volumes = [
            k8s.V1Volume(
                name="dshm",
                empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=k8s_conf.shm_size),
            ),
            k8s.V1Volume(
                name="models",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=k8s_conf.models_claim, read_only=True
                ),
            ),
            k8s.V1Volume(
                name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=k8s_conf.scratch_size)
            ),
        ]
        mounts = [
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="models", mount_path=k8s_conf.models_mount, read_only=True),
            k8s.V1VolumeMount(name="scratch", mount_path=k8s_conf.scratch_mount),
        ]
        env = {"HF_HUB_OFFLINE": "1", **k8s_conf.env, "BABELSYNTH_TRAIN_SCRATCH": k8s_conf.scratch_mount}
        super().__init__(
            name="babelsynth-train",
            image=k8s_conf.image,
            namespace=k8s_conf.namespace,
            cmds=["torchrun"],
            volumes=volumes,
            volume_mounts=mounts,
            env_vars=env,
            env_from=[
                k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s))
                for s in k8s_conf.env_from_secrets
            ]
            or None,
            node_selector=k8s_conf.node_selector or None,
            service_account_name=k8s_conf.service_account,
            deferrable=k8s_conf.deferrable,
            startup_timeout_seconds=k8s_conf.startup_timeout_seconds,
            on_finish_action="delete_succeeded_pod",
            do_xcom_push=False,
            get_logs=True,
            **kwargs,
        )
        self.manifest_uri, self.k8s_conf = manifest_uri, k8s_conf

    def launch(self, context) -> Launch:
        """Set the pod's argv and GPU count from the recipe; returns the launch (also used by tests)."""
        params = context["params"]
        in_pod = None
        if self.k8s_conf.configs_dir:
            in_pod = f"{self.k8s_conf.configs_dir.rstrip('/')}/{PurePosixPath(train_config(params)).name}"
        launch = prepare(self.manifest_uri, params, recipe_in_pod=in_pod)
        self.arguments = torchrun_args(launch.nproc, launch.argv)
        limits = {
            "cpu": self.k8s_conf.cpu,
            "memory": self.k8s_conf.memory,
            "nvidia.com/gpu": str(launch.nproc),
        }
        self.container_resources = k8s.V1ResourceRequirements(limits=limits, requests=dict(limits))
        return launch

    def execute(self, context):
        check_paths(context["params"])  # a path outside the allowed roots fails without retries
        launch = self.launch(context)
        super().execute(context)
        return read_summary(launch.out_uri)

    def trigger_reentry(self, context, event):
        super().trigger_reentry(context, event)  # deferrable mode: raises when the pod failed
        return read_summary(prepare(self.manifest_uri, context["params"]).out_uri)
