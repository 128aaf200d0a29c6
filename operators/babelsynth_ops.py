"""Airflow-side helpers: Airflow params -> config overrides, and one call into babelsynth per task.

Heavy imports happen inside the functions, so DAG files that import this module stay fast to parse.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseOperator

# Param name -> dotted config key. One name per concept: these are the config's own keys.
PARAM_KEYS = {
    "input_uri": "input_uri",
    "output_uri": "output_uri",
    "languages": "run.languages",
    "limit": "run.limit",
    "shard_size": "run.shard_size",
    "max_shards": "run.max_shards",
    "teacher_url": "models.teacher.base_url",
    "llm_url": ("models.judge.base_url", "models.rephraser.base_url"),
    "translator_path": "models.translator.path",
    "comet_path": "models.comet.path",
}


def overrides_from_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, keys in PARAM_KEYS.items():
        value = params.get(name)
        if value is None or value == "" or value == []:
            continue
        for k in (keys,) if isinstance(keys, str) else keys:
            out[k] = value
    return out


# Airflow connection -> the model roles whose OpenAI-compatible endpoint it sets. Params still win.
ENDPOINT_CONNECTIONS = {"babelsynth_teacher": ("teacher",), "babelsynth_llm": ("judge", "rephraser")}


def endpoint_overrides(with_keys: bool = True) -> dict[str, Any]:
    """vLLM endpoints from Airflow connections (e.g. AIRFLOW_CONN_BABELSYNTH_TEACHER='http://:KEY@host:8000/v1').

    The password, if any, is exported to BABELSYNTH_<NAME>_API_KEY in this process only and the config is
    pointed at that variable, so the key never appears in a config, an argv or a log. Pods (with_keys=False)
    get their keys from Kubernetes secrets instead.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    out: dict[str, Any] = {}
    for conn_id, roles in ENDPOINT_CONNECTIONS.items():
        try:
            c = Connection.get(conn_id)
        except AirflowNotFoundException:
            continue
        scheme = "https" if c.conn_type == "https" or c.extra_dejson.get("https") else "http"
        url = (
            f"{scheme}://{c.host}"
            + (f":{c.port}" if c.port else "")
            + (f"/{c.schema.strip('/')}" if c.schema else "")
        )
        key_env = f"BABELSYNTH_{conn_id.removeprefix('babelsynth_').upper()}_API_KEY"
        if with_keys and c.password:
            os.environ[key_env] = c.password
        for role in roles:
            out[f"models.{role}.base_url"] = url
            if with_keys and c.password:
                out[f"models.{role}.api_key_env"] = key_env
    return out


def run_overrides(params: dict[str, Any], with_keys: bool = True) -> dict[str, Any]:
    """Config overrides of a run: connections first, then the params (a param always wins)."""
    return {**endpoint_overrides(with_keys), **overrides_from_params(params)}


def config_path(params: dict[str, Any]) -> str:
    return params.get("config_path") or os.environ.get("BABELSYNTH_CONFIG", "configs/demo.yaml")


MAX_MAPPED = 256  # default bound on mapped tasks per stage; Airflow's scheduler struggles past a few thousand


def load(params: dict[str, Any]):
    """The run config with the params applied; run.max_shards is clamped to the DAG's mapping bound."""
    from babelsynth.config import load_config

    over = run_overrides(params)
    cfg = load_config(config_path(params), over)
    if cfg.run.max_shards > MAX_MAPPED:
        cfg = load_config(config_path(params), {**over, "run.max_shards": MAX_MAPPED})
    return cfg


def plan(params: dict[str, Any], run_id: str) -> list[int]:
    from babelsynth import runner

    return runner.plan(load(params), run_id)


def compact(stats: dict, uri: str | None = None) -> dict:
    """What a stage task pushes to XCom: counts and where the result is, never rows."""
    out = {k: stats[k] for k in ("stage", "in", "out", "rejected") if k in stats}
    return {**out, "uri": uri} if uri else out


def run_stage(stage: str, shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    cfg = load(params)
    stats = runner.run_stage(cfg, run_id, stage, shard)
    return {"shard": shard, **compact(stats, runner.stage_result_uri(cfg, run_id, stage, shard))}


def write(shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    doc = runner.write_shard(load(params), run_id, shard)
    return {"shard": shard, "files": len(doc["files"]), "rows": sum(f["rows"] for f in doc["files"])}


def commit(params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    cfg = load(params)
    man = runner.commit(cfg, run_id)
    print(runner.summary(man))
    uri = runner.layout(cfg, run_id).manifest_uri
    return {
        "manifest_uri": uri,
        "run_id": run_id,
        "samples_by_lang": man["samples_by_lang"],
        "rejected": man["rejected_total"],
    }


def train(manifest_uri: str, train_config: str, out_uri: str | None = None) -> dict:
    from babelsynth.train.run import train_from_manifest

    return train_from_manifest(manifest_uri, train_config, out_uri)


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
