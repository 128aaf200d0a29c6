"""Training recipe on a pipeline run: alignment -> SFT -> cross-modal merge -> held-out eval.

Modules: config (validated settings), plan (per-rank memory from config.json, checked before any weight
is read), data (streaming, chat template, loss mask, packing, mixture), loss (chunked cross-entropy; the
module FSDP wraps), parallel (process group, FSDP2 sharding, shard loading, export), checkpoint (sharded,
world-size-independent checkpoints), outputs (local scratch -> the output URI, S3 or a path), sft (one
phase), merge (family check, linear LLM merge tensor by tensor), weights (the VLM <-> text-LLM weight
names), evaluate (held-out losses, the in-memory alpha sweep), pipeline (`train_and_merge`), run (the
recipe file; what the CLI and the DAG call). docs/training.md explains the whole.
Heavy imports (torch, transformers) happen inside these modules, never here.
"""

from babelsynth.train.config import (
    EvalConfig,
    MergeConfig,
    MixtureConfig,
    PhaseConfig,
    Phases,
    Resources,
    TrainConfig,
)

__all__ = ["EvalConfig", "MergeConfig", "MixtureConfig", "PhaseConfig", "Phases", "Resources", "TrainConfig"]
