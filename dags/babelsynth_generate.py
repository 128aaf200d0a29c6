"""babelsynth_generate: English image-text -> recaption -> judge -> 23-language translation -> rephrase
-> scores/gates -> sharded Parquet + manifest. Manual runs take params; a nightly schedule regenerates.

plan (logs the cost estimate, refuses a run over the budget cap) -> shard.* -> commit (manifest from the
shards' metadata, comparison with the previous run and its alarms) -> report (report.html, dataset_card.md)
-> publish (moves the `latest` pointer and emits the asset unless a `fail` alarm fired) -> retention (a
teardown: removes runs older than the last K, never the one `latest` names). Failures and alarms go to the
configured notifiers (operators/notify.py).

Every task writes under <output_uri>/<run_id>/ and skips work whose result exists, so a retry or a
re-triggered run with the same run id redoes nothing. Manual runs have no logical date in Airflow 3:
nothing here uses it (outputs are keyed by run id; the asset event records run_after).
Only airflow.sdk and the thin operators package are imported here: parsing stays well under 1 s.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task, task_group

from operators import tasks
from operators.boundary import pattern
from operators.notify import notifiers, notify
from operators.params import MAX_MAPPED
from operators.placement import STAGES, load_placement
from operators.stage import stage_operator

SHARDS_ASSET = Asset(name="babelsynth_shards", uri="file:///babelsynth/shards")
LANG_CODE = "^[a-z]{3}_[A-Z][a-z]{3}$"
PLACEMENT = load_placement()  # where each stage runs: $BABELSYNTH_AIRFLOW_CONFIG (configs/airflow.yaml)
MAX_SHARDS = MAX_MAPPED  # the fan-out bound: at most this many mapped tasks per stage


def _schedule() -> str | None:
    """Nightly at 02:00 UTC unless $BABELSYNTH_GENERATE_SCHEDULE says otherwise ("none": manual runs only)."""
    value = os.environ.get("BABELSYNTH_GENERATE_SCHEDULE", "0 2 * * *").strip()
    return None if value.lower() in ("none", "off", "") else value


def _str(description: str) -> Param:
    return Param(None, type=["null", "string"], minLength=1, description=description)


def _path(param: str, description: str) -> Param:
    """A path param: at trigger time only values under the deployment's allowed roots (400 otherwise)."""
    roots = PLACEMENT.allowed_roots.of(param)
    where = ", ".join(roots) if roots else "none: set allowed_roots in $BABELSYNTH_AIRFLOW_CONFIG"
    return Param(
        None,
        type=["null", "string"],
        minLength=1,
        pattern=pattern(roots),
        description=f"{description}; allowed under: {where}",
    )


@dag(
    dag_id="babelsynth_generate",
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["babelsynth", "generation"],
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=10),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "on_failure_callback": notifiers(),
    },
    params={
        "config_path": _path("config_path", "YAML run config; default $BABELSYNTH_CONFIG"),
        "input_uri": _path(
            "input_uri", "English input: a file, a folder or a glob, local or s3:// (see input_format)"
        ),
        "input_format": Param(
            None,
            type=["null", "string"],
            enum=[None, "canonical", "cauldron", "messages", "llava", "webdataset"],
            description="input adapter (input.format): canonical babelsynth Parquet, HF Parquet in The "
            "Cauldron's or the chat-messages shape, LLaVA JSON/JSONL, WebDataset tars",
        ),
        "output_uri": _path(
            "output_uri", "output root (path or s3://); the run writes <output_uri>/<run_id>/"
        ),
        "languages": Param(
            None,
            type=["null", "array"],
            minItems=1,
            uniqueItems=True,
            items={"type": "string", "pattern": LANG_CODE},
            description="FLORES-200 target codes, e.g. deu_Latn; default: the 23 Aya codes",
        ),
        "limit": Param(
            None, type=["null", "integer"], minimum=1, description="use the first N input records"
        ),
        "shard_size": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=100000,
            description="records per shard (grows if needed to respect max_shards)",
        ),
        "max_shards": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=MAX_SHARDS,
            description=f"fan-out bound: at most this many mapped tasks per stage (<= {MAX_SHARDS})",
        ),
        "teacher_url": _str("OpenAI-compatible /v1 URL of the teacher VLM (vLLM)"),
        "llm_url": _str("OpenAI-compatible /v1 URL of the judge/rephraser LLM (vLLM)"),
        "translator_path": _path("translator_path", "CTranslate2 NLLB-200 model dir"),
        "comet_path": _path("comet_path", "COMET (CometKiwi) checkpoint .ckpt"),
    },
    doc_md=__doc__,
)
def babelsynth_generate():
    @task
    def plan(params=None) -> list[int]:
        return tasks.plan(params, get_current_context()["run_id"])

    @task
    def write(shard: int, params=None) -> dict:
        return tasks.write(shard, params, get_current_context()["run_id"])

    @task_group(group_id="shard")
    def per_shard(shard: int):
        prev = None
        for name in STAGES:
            t = stage_operator(name, shard, PLACEMENT)
            if prev is not None:
                prev >> t
            prev = t
        prev >> write(shard)

    @task
    def commit(params=None) -> dict:
        ctx = get_current_context()
        return tasks.commit(params, ctx["run_id"], ctx["dag"].dag_id)

    @task
    def report(params=None) -> dict:
        ctx = get_current_context()
        return tasks.report(params, ctx["run_id"], ctx["dag"].dag_id)

    @task(outlets=[SHARDS_ASSET])
    def publish(params=None) -> dict:
        ctx = get_current_context()
        out = tasks.publish(params, ctx["run_id"], ctx["dag"].dag_id)
        if out["warnings"]:
            notify(ctx, "warned", "; ".join(out["warnings"]))
        run_after = ctx["dag_run"].run_after
        ctx["outlet_events"][SHARDS_ASSET].extra = {
            "manifest_uri": out["manifest_uri"],
            "latest_uri": out["latest_uri"],
            "output_uri": out["output_uri"],
            "run_id": out["run_id"],
            "run_after": run_after.isoformat() if run_after else None,
        }
        return out

    @task
    def retention(params=None) -> dict:
        return tasks.retention(params, get_current_context()["dag"].dag_id)

    # retention is a teardown: it runs every night whatever happened before it (never deleting `latest`),
    # and the run's state stays that of publish, so a night refused by its alarms shows as failed (a failed
    # retention shows on its own task and reaches the notifiers)
    (per_shard.expand(shard=plan()) >> commit() >> report() >> publish() >> retention().as_teardown())


babelsynth_generate()
