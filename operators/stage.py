"""The stage task: in the Airflow worker here; in a venv or a pod through operators/venv.py and
operators/pod.py, imported only when the placement config puts a stage there (they never import this)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from operators.tasks import run_stage


class BabelsynthStageOperator(BaseOperator):
    """Run one stage on one shard inside the Airflow worker: arguments plus one library call.

    `shard` is templated, so it can be the argument of a mapped task group. The config path and the
    overrides come from the run's params, as in every other task of the DAG.
    """

    template_fields = ("shard",)
    ui_color = "#e8f0fe"

    def __init__(self, *, stage: str, shard: Any, **kwargs):
        super().__init__(**kwargs)
        self.stage, self.shard = stage, shard

    def execute(self, context):
        return run_stage(self.stage, int(self.shard), context["params"], context["run_id"])


def stage_operator(stage: str, shard: Any, placement) -> BaseOperator:
    """The task for one stage where the placement config puts it; model stages get the GPU pool."""
    kw: dict[str, Any] = {"task_id": stage, "stage": stage, "shard": shard}
    if placement.pool_for(stage):
        kw.update(pool=placement.pool_for(stage), pool_slots=placement.pool_slots)
    where = placement.where(stage)
    if where == "worker":
        return BabelsynthStageOperator(**kw)
    if where == "venv":
        from operators.venv import BabelsynthVenvStageOperator

        return BabelsynthVenvStageOperator(python=placement.venv.python, **kw)
    from operators.pod import BabelsynthPodStageOperator

    return BabelsynthPodStageOperator(k8s=placement.kubernetes, **kw)
