"""Airflow params -> babelsynth config overrides, and the run config a task loads.

Most params are the config's own dotted keys (input_uri, output_uri, run.*); input_format is input.format.
Four are not config keys and map onto models.*: teacher_url -> models.teacher.base_url; llm_url ->
models.judge.base_url and models.rephraser.base_url; translator_path -> models.translator.path;
comet_path -> models.comet.path.
config_path is no override: it picks the config file. Path params are checked against the deployment's
allowed roots (operators/boundary.py) before anything is read. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import os
from typing import Any

from operators.boundary import check_params
from operators.hooks import endpoint_overrides
from operators.placement import load_placement

PARAM_KEYS = {
    "input_uri": "input_uri",
    "input_format": "input.format",
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
    """Config overrides of a run: endpoint connections first, then the params (a param always wins).
    Raises ParamBoundaryError when a path param is outside the deployment's allowed roots."""
    check_params(params, load_placement().allowed_roots)
    return {**endpoint_overrides(with_keys), **overrides_from_params(params)}


def config_path(params: dict[str, Any]) -> str:
    return params.get("config_path") or os.environ.get("BABELSYNTH_CONFIG", "configs/demo.yaml")


def load(params: dict[str, Any], files: bool = False):
    """The run config with the overrides applied; run.max_shards is clamped to the DAG's mapping bound.

    A configuration error (unset variable, invalid value; with `files`, a missing input or model) raises
    ConfigError, one line per problem, which names where the config came from; tasks.fail_fast turns it
    into a failure without retries (retries are for transient faults, and this is not one).
    """
    from babelsynth.checks import ConfigError, validate_config

    path, over = config_path(params), run_overrides(params)
    try:
        cfg = validate_config(path, over, files=files)
        if cfg.run.max_shards > MAX_MAPPED:
            cfg = validate_config(path, {**over, "run.max_shards": MAX_MAPPED})
    except ConfigError as e:
        if not params.get("config_path"):
            e.origin = " (from $BABELSYNTH_CONFIG; the config_path param overrides it)"
        raise
    return cfg
