"""Training recipe on a pipeline run: alignment -> SFT -> cross-modal merge -> held-out eval.

Modules: config (validated settings), data (streaming, chat template, loss mask, packing, mixture),
sft (the two phases + checkpoint/resume), merge (linear LLM merge, tensor by tensor), weights (the
VLM <-> text-LLM weight names), evaluate
(held-out losses), pipeline (`train_and_merge`, the one call the DAG and `make demo` use).
Heavy imports (torch, transformers) happen inside these modules, never here.
"""

from babelsynth.train.config import EvalConfig, MergeConfig, MixtureConfig, PhaseConfig, Phases, TrainConfig

__all__ = ["EvalConfig", "MergeConfig", "MixtureConfig", "PhaseConfig", "Phases", "TrainConfig"]
