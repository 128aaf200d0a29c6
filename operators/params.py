"""Airflow params -> babelsynth config overrides, and the run config a task loads.

Most params are the config's own dotted keys (input_uri, output_uri, run.*). Four are not config keys
and map onto models.*: teacher_url -> models.teacher.base_url; llm_url -> models.judge.base_url and
models.rephraser.base_url; translator_path -> models.translator.path; comet_path -> models.comet.path.
config_path is no override: it picks the config file. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import os
from typing import Any

from operators.hooks import endpoint_overrides

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

MAX_MAPPED = 256  # default bound on mapped tasks per stage; Airflow's scheduler struggles past a few thousand


def overrides_from_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, keys in PARAM_KEYS.items():
        value = params.get(name)
        if value is None or value == "" or value == []:
            continue
        for k in (keys,) if isinstance(keys, str) else keys:
            out[k] = value
    return out


def run_overrides(params: dict[str, Any], with_keys: bool = True) -> dict[str, Any]:
    """Config overrides of a run: endpoint connections first, then the params (a param always wins)."""
    return {**endpoint_overrides(with_keys), **overrides_from_params(params)}


def config_path(params: dict[str, Any]) -> str:
    return params.get("config_path") or os.environ.get("BABELSYNTH_CONFIG", "configs/demo.yaml")


def load(params: dict[str, Any]):
    """The run config with the overrides applied; run.max_shards is clamped to the DAG's mapping bound."""
    from babelsynth.config import load_config

    over = run_overrides(params)
    cfg = load_config(config_path(params), over)
    if cfg.run.max_shards > MAX_MAPPED:
        cfg = load_config(config_path(params), {**over, "run.max_shards": MAX_MAPPED})
    return cfg
