"""One babelsynth call per task (plan, a stage in the worker, write, commit, train): what the DAGs'
@task functions and the in-worker stage operator call. Heavy imports stay inside the functions."""

from __future__ import annotations

import functools
from typing import Any

from operators.boundary import ParamBoundaryError, check_params
from operators.params import load
from operators.placement import load_placement


def fail_fast(fn):
    """Errors no retry can fix (a config that cannot run as deployed, a path param outside the allowed
    roots, a run id re-triggered with another config, an estimate above the budget cap) fail the task at
    once (AirflowFailException) instead of being retried with backoff."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from babelsynth.checks import ConfigError
        from babelsynth.estimate import BudgetExceeded
        from babelsynth.fingerprint import ConfigDriftError

        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            raise AirflowFailException(
                f"configuration error, not retried: config {e.path}{e.origin}\n{e}"
            ) from e
        except (BudgetExceeded, ConfigDriftError, ParamBoundaryError) as e:
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e

    return run


@fail_fast
def check_paths(params: dict[str, Any]) -> None:
    """ParamBoundaryError when a path param is outside the deployment's allowed roots (boundary.py)."""
    check_params(params or {}, load_placement().allowed_roots)


@fail_fast
def plan(params: dict[str, Any], run_id: str) -> list[int]:
    """Validates the config as deployed (variables, schema, input and model files) before anything else."""
    from babelsynth import runner

    return runner.plan(load(params, files=True), run_id)


def compact(stats: dict, uri: str | None = None) -> dict:
    """What a stage task pushes to XCom: counts and where the result is, never rows."""
    out = {k: stats[k] for k in ("stage", "in", "out", "rejected") if k in stats}
    return {**out, "uri": uri} if uri else out


@fail_fast
def run_stage(stage: str, shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    cfg = load(params)
    stats = runner.run_stage(cfg, run_id, stage, shard)
    return {"shard": shard, **compact(stats, runner.stage_result_uri(cfg, run_id, stage, shard))}


@fail_fast
def write(shard: int, params: dict[str, Any], run_id: str) -> dict:
    from babelsynth import runner

    doc = runner.write_shard(load(params), run_id, shard)
    return {"shard": shard, "files": len(doc["files"]), "rows": sum(f["rows"] for f in doc["files"])}


def load_series(params: dict[str, Any], dag_id: str | None):
    """The run config whose nightly.series is the DAG id unless the config names one: runs of one DAG are
    compared with each other, not with runs another DAG (or the CLI) wrote under the same output_uri."""
    cfg = load(params)
    if dag_id and cfg.nightly.series is None:
        cfg = cfg.model_copy(update={"nightly": cfg.nightly.model_copy(update={"series": dag_id})})
    return cfg


@fail_fast
def commit(params: dict[str, Any], run_id: str, dag_id: str | None = None) -> dict:
    from babelsynth import runner

    cfg = load_series(params, dag_id)
    man = runner.commit(cfg, run_id)
    print(runner.summary(man))
    lay = runner.layout(cfg, run_id)
    return {
        "manifest_uri": lay.manifest_uri,
        "report_uri": lay.report_uri,
        "run_id": run_id,
        "samples_by_lang": man["samples_by_lang"],
        "rejected": man["rejected_total"],
        "alarms_failed": bool((man.get("alarms") or {}).get("failed")),
    }


def report(params: dict[str, Any], run_id: str, dag_id: str | None = None) -> dict:
    """report.html and dataset_card.md of the committed run (reads its Parquet files; commit does not)."""
    from babelsynth import runner

    return runner.report(load_series(params, dag_id), run_id)


@fail_fast
def publish(params: dict[str, Any], run_id: str, dag_id: str | None = None) -> dict:
    """Move `latest` to the committed run; a `fail` alarm fails the task at once (no retry can fix it)."""
    from babelsynth import nightly

    cfg = load_series(params, dag_id)
    try:
        res = nightly.publish(cfg, run_id)
    except nightly.AlarmFailed as e:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(e)) from e
    for w in res["warnings"]:
        print(f"alarm (warn): {w}")
    return {
        "published": res["published"],
        "run_id": run_id,
        "manifest_uri": res["latest"]["manifest_uri"] if res["published"] else None,
        "latest_uri": res["latest_uri"],
        "output_uri": cfg.output_uri,
        "warnings": res["warnings"],
    }


@fail_fast
def retention(params: dict[str, Any], dag_id: str | None = None) -> dict:
    from babelsynth import nightly

    return nightly.retain(load_series(params, dag_id))


def latest_manifest(output_uri: str) -> str:
    """The manifest the `latest` pointer of an output root names (what the training DAG trains on)."""
    from babelsynth import nightly

    latest = nightly.read_latest(output_uri)
    if latest is None:
        raise ValueError(f"no run published under {output_uri} yet (no latest pointer)")
    return latest["manifest_uri"]


def train(manifest_uri: str, params: dict[str, Any]) -> dict:
    """Training under torchrun in this worker (the recipe's process count); rank 0's summary."""
    from operators.train_launch import run_local

    return run_local(manifest_uri, params)
