"""babelsynth_train: SFT (connector alignment, then SFT) on a run's shards, then the cross-modal merge
W = a*W_multimodal + (1-a)*W_text of the LLM weights. Scheduled on the shards Asset; the manifest URI
comes from the triggering event, or from the `manifest_uri` param for a manual run.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

from operators import tasks
from operators.placement import load_placement

SHARDS_ASSET = Asset(name="babelsynth_shards", uri="file:///babelsynth/shards")


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
            None, type=["null", "string"], description="training YAML; default $BABELSYNTH_TRAIN_CONFIG"
        ),
        "out_uri": Param(
            None, type=["null", "string"], description="where checkpoints go; default next to the run"
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

    @task(pool=load_placement().pool)  # training holds a GPU: the same pool as the model stages
    def train_and_merge(uri: str, params=None) -> dict:
        cfg = params.get("train_config") or os.environ.get(
            "BABELSYNTH_TRAIN_CONFIG", "configs/train_demo.yaml"
        )
        return tasks.train(uri, cfg, params.get("out_uri"))

    train_and_merge(manifest_uri())


babelsynth_train()
