"""babelsynth_train: SFT (connector alignment, then SFT) on a run's shards, then the cross-modal merge
W = a*W_multimodal + (1-a)*W_text of the LLM weights. Scheduled on the shards Asset (emitted by a published
run). The manifest: the `manifest_uri` param; else the run the `latest` pointer names (the `output_uri`
param, or the output root of the triggering event), so training always takes the last run that passed
its alarms; else the triggering event's manifest.

The training task runs `babelsynth train` under torchrun with the recipe's process count: in the worker
or as one multi-GPU pod, as the placement config's `train` section says (docs/training.md). The recipe
is the `train_config` param or $BABELSYNTH_TRAIN_CONFIG; without one the task fails (no demo fallback).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

from operators import tasks
from operators.boundary import pattern
from operators.notify import notifiers
from operators.placement import load_placement

SHARDS_ASSET = Asset(name="babelsynth_shards", uri="file:///babelsynth/shards")
PLACEMENT = load_placement()
ROOTS = PLACEMENT.allowed_roots  # where path params may point (operators/boundary.py)


def _path(param: str, description: str) -> Param:
    """A path param: at trigger time only values under the deployment's allowed roots (400 otherwise)."""
    roots = ROOTS.of(param)
    where = ", ".join(roots) if roots else "none: set allowed_roots in $BABELSYNTH_AIRFLOW_CONFIG"
    return Param(
        None,
        type=["null", "string"],
        minLength=1,
        pattern=pattern(roots),
        description=f"{description}; allowed under: {where}",
    )


@dag(
    dag_id="babelsynth_train",
    schedule=[SHARDS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    # Runs only on a generation run's Asset event: created paused, it would silently never run after one.
    is_paused_upon_creation=False,
    tags=["babelsynth", "training"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "on_failure_callback": notifiers(),
    },
    params={
        "manifest_uri": _path("manifest_uri", "run manifest; default: the run `latest` names"),
        "output_uri": _path("output_uri", "output root whose `latest` run to train on"),
        "train_config": _path("train_config", "training YAML; default $BABELSYNTH_TRAIN_CONFIG"),
        "out_uri": _path("out_uri", "where checkpoints go; default next to the run"),
    },
    doc_md=__doc__,
)
def babelsynth_train():
    @task
    def manifest_uri(params=None) -> str:
        tasks.check_paths(params)  # output_uri is read here (its `latest`), so checked before
        if params.get("manifest_uri"):
            return params["manifest_uri"]
        if params.get("output_uri"):
            return tasks.latest_manifest(params["output_uri"])
        events = get_current_context().get("triggering_asset_events") or {}
        for evs in events.values():
            for ev in reversed(list(evs)):
                extra = ev.extra or {}
                if extra.get("output_uri"):
                    return tasks.latest_manifest(extra["output_uri"])
                if extra.get("manifest_uri"):
                    return extra["manifest_uri"]
        raise ValueError(
            "no manifest: trigger with manifest_uri or output_uri, or through the babelsynth_shards asset"
        )

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
            tasks.check_paths(params)  # the trigger's paths, before any read (the asset's URI is our own)
            return tasks.train(uri, params)

        train_and_merge(uri)


babelsynth_train()
