"""babelsynth_generate: English image-text -> recaption -> judge -> 23-language translation -> rephrase
-> scores/gates -> sharded Parquet + manifest. Manual runs take params; a nightly schedule regenerates.

Only airflow.sdk and the thin operators module are imported here: parsing stays well under 1 s.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task, task_group

from operators import babelsynth_ops as ops

STAGES = ("ingest", "recaption", "judge", "translate", "rephrase", "score")
SHARDS_ASSET = Asset(name="babelsynth_shards", uri="file:///babelsynth/shards")
LANG_CODE = "^[a-z]{3}_[A-Z][a-z]{3}$"


def _run_key() -> str:
    ctx = get_current_context()
    return ctx["run_id"]


@dag(
    dag_id="babelsynth_generate",
    schedule=os.environ.get("BABELSYNTH_GENERATE_SCHEDULE", "0 2 * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["babelsynth", "generation"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10), "retry_exponential_backoff": True,
                  "max_retry_delay": timedelta(minutes=10)},  # fmt: skip
    params={
        "config_path": Param(None, type=["null", "string"], description="YAML config; default $BABELSYNTH_CONFIG"),
        "input_uri": Param(None, type=["null", "string"], description="canonical input Parquet (path or s3://)"),
        "output_uri": Param(None, type=["null", "string"], description="output root (path or s3://)"),
        "languages": Param(None, type=["null", "array"], items={"type": "string", "pattern": LANG_CODE},
                           description="FLORES-200 target codes; default: the 23 Aya codes"),
        "limit": Param(None, type=["null", "integer"], minimum=1, description="use the first N records"),
        "shard_size": Param(None, type=["null", "integer"], minimum=1, maximum=100000),
        "max_shards": Param(None, type=["null", "integer"], minimum=1, maximum=256),
        "teacher_url": Param(None, type=["null", "string"], description="OpenAI-compatible URL of the teacher VLM"),
        "llm_url": Param(None, type=["null", "string"], description="OpenAI-compatible URL of judge/rephraser"),
    },  # fmt: skip
    doc_md=__doc__,
)
def babelsynth_generate():
    @task
    def plan(params=None) -> list[int]:
        return ops.plan(params, _run_key())

    @task(pool=os.environ.get("BABELSYNTH_MODEL_POOL", "default_pool"))
    def stage(name: str, shard: int, params=None) -> dict:
        return ops.run_stage(name, shard, params, _run_key())

    @task
    def write(shard: int, params=None) -> dict:
        return ops.write(shard, params, _run_key())

    @task_group(group_id="shard")
    def per_shard(shard: int):
        prev = None
        for name in STAGES:
            t = stage.override(task_id=name)(name, shard)
            if prev is not None:
                prev >> t
            prev = t
        prev >> write(shard)

    @task(outlets=[SHARDS_ASSET])
    def commit(params=None) -> dict:
        out = ops.commit(params, _run_key())
        get_current_context()["outlet_events"][SHARDS_ASSET].extra = {
            "manifest_uri": out["manifest_uri"], "run_id": out["run_id"]}  # fmt: skip
        return out

    shards = plan()
    per_shard.expand(shard=shards) >> commit()


babelsynth_generate()
