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


def config_path(params: dict[str, Any]) -> str:
    return params.get("config_path") or os.environ.get("BABELSYNTH_CONFIG", "configs/demo.yaml")


def load(params: dict[str, Any]):
    from babelsynth.config import load_config

    return load_config(config_path(params), overrides_from_params(params))


def plan(params: dict[str, Any], run_id: str) -> list[int]:
    from babelsynth import runner

    return runner.plan(load(params), run_id)


def run_stage(stage: str, shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    return runner.run_stage(load(params), run_id, stage, shard)


def write(shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    doc = runner.write_shard(load(params), run_id, shard)
    return {"shard": shard, "files": len(doc["files"]), "rows": sum(f["rows"] for f in doc["files"])}


def commit(params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner, storage

    cfg = load(params)
    man = runner.commit(cfg, run_id)
    print(runner.summary(man))
    uri = storage.join(runner.run_root(cfg, run_id), runner.MANIFEST)
    return {"manifest_uri": uri, "run_id": run_id, "samples_by_lang": man["samples_by_lang"],
            "rejected": man["rejected_total"]}  # fmt: skip


def train(manifest_uri: str, train_config: str, out_uri: str | None = None) -> dict:
    from babelsynth.train.run import train_from_manifest

    return train_from_manifest(manifest_uri, train_config, out_uri)


class BabelsynthStageOperator(BaseOperator):
    """Run one babelsynth stage on one shard: arguments plus one call into the library."""

    template_fields = ("config_path", "run_key", "overrides")

    def __init__(self, *, stage: str, shard: int, config_path: str, run_key: str = "{{ run_id }}",
                 overrides: dict | None = None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.stage, self.shard, self.config_path, self.run_key = stage, shard, config_path, run_key
        self.overrides = overrides or {}

    def execute(self, context):
        from babelsynth import runner
        from babelsynth.config import load_config

        return runner.run_stage(load_config(self.config_path, self.overrides), self.run_key, self.stage, self.shard)
