"""babelsynth_train: SFT (connector alignment, then SFT) on a run's shards, then the cross-modal merge
W = a*W_multimodal + (1-a)*W_text of the LLM weights. Scheduled on the shards Asset; the manifest URI
comes from the triggering event, or from the `manifest_uri` param for a manual run.

The training task runs `babelsynth train` under torchrun with the recipe's process count: in the worker
or as one multi-GPU pod, as the placement config's `train` section says (docs/training.md). The recipe
is the `train_config` param or $BABELSYNTH_TRAIN_CONFIG; without one the task fails (no demo fallback).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

from operators import tasks
from operators.placement import load_placement

SHARDS_ASSET = Asset(name="babelsynth_shards", uri="file:///babelsynth/shards")
PLACEMENT = load_placement()


@dag(
    dag_id="babelsynth_train",
    schedule=[SHARDS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["babelsynth", "training"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    },
    params={
        "manifest_uri": Param(
            None, type=["null", "string"], description="run manifest; default: triggering event"
        ),
        "train_config": Param(
            None,
            type=["null", "string"],
            description="training recipe YAML; default $BABELSYNTH_TRAIN_CONFIG (one of them is required)",
        ),
        "out_uri": Param(
            None,
            type=["null", "string"],
            description="training output (S3 or path); default <run>/training next to the run",
        ),
    },
    doc_md=__doc__,
)
def babelsynth_train():
    @task
    def manifest_uri(params=None) -> str:
        if params.get("manifest_uri"):
            return params["manifest_uri"]
        events = get_current_context().get("triggering_asset_events") or {}
        for evs in events.values():
            for ev in reversed(list(evs)):
                if (ev.extra or {}).get("manifest_uri"):
                    return ev.extra["manifest_uri"]
        raise ValueError("no manifest_uri: trigger with the param or through the babelsynth_shards asset")

    uri = manifest_uri()
    # training holds GPUs: slots of the same pool as the model stages, one per GPU (train.pool_slots)
    if PLACEMENT.train.where == "kubernetes":
        from operators.train_pod import BabelsynthTrainPodOperator

        BabelsynthTrainPodOperator(
            task_id="train_and_merge",
            manifest_uri=uri,
            k8s_conf=PLACEMENT.train.kubernetes,
            pool=PLACEMENT.pool,
            pool_slots=PLACEMENT.train.pool_slots,
        )
    else:

        @task(pool=PLACEMENT.pool, pool_slots=PLACEMENT.train.pool_slots)
        def train_and_merge(uri: str, params=None) -> dict:
            return tasks.train(uri, params)

        train_and_merge(uri)


babelsynth_train()
