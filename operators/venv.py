"""Run a stage in another Python environment (@task.external_python), e.g. the vLLM venv for offline vLLM.

Imported only when the placement config puts a stage in `venv`, so the default DAG does not pay for it.
The target interpreter needs babelsynth and its base dependencies installed; it does not need Airflow.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.python import ExternalPythonOperator

from operators.params import config_path, run_overrides
from operators.tasks import check_paths


def _run_stage_in_venv(config_file: str, overrides: dict, run_key: str, stage: str, shard: int) -> dict:
    """Runs in the target interpreter (its source is shipped there): the same library call as the worker."""
    from babelsynth import runner
    from babelsynth.config import load_config

    cfg = load_config(config_file, overrides)
    stats = runner.run_stage(cfg, run_key, stage, shard)
    uri = runner.stage_result_uri(cfg, run_key, stage, shard)
    return {**{k: stats[k] for k in ("stage", "in", "out", "rejected")}, "uri": uri}


class BabelsynthVenvStageOperator(ExternalPythonOperator):
    """One stage of one shard in `python` (no Airflow needed there); pushes counts only."""

    template_fields = (*ExternalPythonOperator.template_fields, "shard")

    def __init__(self, *, stage: str, shard: Any, python: str, **kwargs):
        super().__init__(python=python, python_callable=_run_stage_in_venv, expect_airflow=False, **kwargs)
        self.stage, self.shard = stage, shard

    def execute(self, context):
        params = context["params"]
        check_paths(params)  # before anything runs: a path outside the allowed roots fails without retries
        self.op_kwargs = {
            "config_file": config_path(params),
            "overrides": run_overrides(params),
            "run_key": context["run_id"],
            "stage": self.stage,
            "shard": int(self.shard),
        }
        return {"shard": int(self.shard), **super().execute(context)}
