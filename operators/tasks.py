"""One babelsynth call per task (plan, a stage in the worker, write, commit, train): what the DAGs'
@task functions and the in-worker stage operator call. Heavy imports stay inside the functions."""

from __future__ import annotations

from typing import Any

from operators.params import load


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


def train(manifest_uri: str, params: dict[str, Any]) -> dict:
    """Training under torchrun in this worker (the recipe's process count); rank 0's summary."""
    from operators.train_launch import run_local

    return run_local(manifest_uri, params)
