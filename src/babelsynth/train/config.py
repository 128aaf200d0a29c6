"""Validated configuration for the two training phases, the merge and the held-out eval.

Defaults are the Aya Vision 8B numbers (paper §4.2, Table 6; notes/paper.md §8-9) so a YAML file only
states what differs. `TrainConfig.smoke()` is the few-step CPU setting used by tests and `make demo`.
Unknown keys fail at load (`extra="forbid"`), before any model is loaded. The two training steps are
"phases" (`phases:` in a recipe), never "stages": stages are the data pipeline's. Memory settings
(micro-batch, activation checkpointing, loss chunk, `resources`) are what the planner
(`babelsynth.train.plan`) reads to decide, before any weight is loaded, whether a run fits.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Phase = Literal["alignment", "sft"]
PHASES: tuple[Phase, ...] = ("alignment", "sft")
Bucket = Literal["multilingual", "english_synthetic", "original"]
BUCKETS: tuple[Bucket, ...] = ("multilingual", "english_synthetic", "original")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhaseConfig(_Strict):
    """One optimisation phase: AdamW, linear warmup, cosine decay to `min_lr_ratio` x peak."""

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(200, ge=0, description="capped by `steps` (see effective_warmup)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description='paper: cosine "10%" = decay to 10% of peak')
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(
        0.0, ge=0, description="not stated in the paper; applied to >=2-D tensors only"
    )
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1, description="rows per optimizer step (packed rows when packing)")
    micro_batch_size: int = Field(
        1, ge=1, description="rows per forward on one rank; a rank's share of the batch is accumulated"
    )
    max_seq_len: int = Field(8192, ge=8)
    packing: bool = False
    seed: int = 0
    activation_checkpointing: bool = Field(
        True, description="recompute each decoder layer in backward: keeps one layer's activations"
    )
    loss_chunk_tokens: int = Field(
        1024, ge=1, description="answer tokens per LM-head + cross-entropy chunk (bounds logits memory)"
    )

    @property
    def effective_warmup(self) -> int:
        """Warmup never exceeds the run, so a 5-step smoke run still reaches its peak LR."""
        return min(self.warmup_steps, self.steps)

    def rows_per_rank(self, world: int) -> int:
        """A rank's share of one optimizer step's rows; the batch must split evenly."""
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of the world size {world}; "
                f"set batch_size to a multiple of resources.nproc_per_node x resources.nnodes"
            )
        return self.batch_size // world

    def micro_for(self, world: int) -> int:
        return min(self.micro_batch_size, self.rows_per_rank(world))

    def lr_factor(self, step: int) -> float:
        """Multiplier on the peak LR for optimizer step `step` (0-based); a pure function for LambdaLR."""
        w = self.effective_warmup
        if step < w:
            return (step + 1) / w
        decay = max(1, self.steps - w)
        progress = min(1.0, (step - w) / decay)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MixtureConfig(_Strict):
    """Sampling ratios by bucket (paper §7.2: 35% multilingual / 31% English synthetic / 34% original).

    A run's shards only hold the synthetic data: rows with `lang != eng_Latn` are `multilingual`,
    `eng_Latn` rows are `english_synthetic`, and `original` (the untouched academic sets) is absent.
    Buckets with no rows are dropped and the remaining ratios renormalised, so the default becomes
    0.35/0.66 = 53% multilingual and 47% English. The same mixture feeds both phases: the paper's
    alignment data (LLaVA-Pretrain + 14% multilingual) is not in a run, so it is not reproduced here.
    """

    multilingual: float = Field(0.35, ge=0)
    english_synthetic: float = Field(0.31, ge=0)
    original: float = Field(0.34, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> MixtureConfig:
        if self.multilingual + self.english_synthetic + self.original <= 0:
            raise ValueError("mixture ratios are all zero; give at least one bucket a positive weight")
        return self


class MergeConfig(_Strict):
    """Cross-modal merge (paper Eq. 1): alpha is the weight on the multimodal LLM; 0.4 was chosen.

    Only `alpha` is written to disk. `sweep` (optional, paper Fig. 9: 0.3 ... 1.0) is evaluated in memory:
    each alpha is interpolated into one loaded model tensor by tensor and scored, nothing is written."""

    alpha: float = Field(0.4, ge=0, le=1)
    sweep: list[float] = Field(default_factory=list, description="alphas to evaluate, e.g. [0.3, ..., 1.0]")
    max_shard_bytes: int = Field(2 << 30, ge=1 << 10)
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype of the merged weights")

    @field_validator("sweep")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"sweep alphas must be in [0, 1], got {bad}")
        return sorted(set(v))


class EvalConfig(_Strict):
    """Held-out split (by hash of sample_id, so it is stable across runs) and eval budget."""

    heldout_fraction: float = Field(0.02, ge=0, lt=1)
    max_batches: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)


class Resources(_Strict):
    """Where the recipe runs: the launcher starts `nproc_per_node` processes (torchrun) per node, and the
    planner checks every rank's memory against `gpu_memory_gib` minus `reserve_fraction` (CUDA context,
    NCCL buffers, allocator fragmentation) before any weight is read."""

    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per node; torchrun --nproc-per-node")
    nnodes: int = Field(1, ge=1, description="nodes; >1 needs one torchrun per node (see docs/training.md)")
    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one accelerator, GiB")
    reserve_fraction: float = Field(0.1, ge=0, lt=1, description="share of gpu_memory_gib never planned")
    cpu_offload: bool = Field(
        False, description="keep sharded weights, grads and AdamW state in host RAM (FSDP2 CPUOffloadPolicy)"
    )

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes


class Phases(_Strict):
    """The two training phases in order (paper §4.2): connector alignment, then SFT."""

    alignment: PhaseConfig = PhaseConfig(steps=9700, lr=1e-4, packing=False, max_seq_len=4096)
    sft: PhaseConfig = PhaseConfig(steps=31000, lr=1e-4, packing=True, max_seq_len=8192)


class TrainConfig(_Strict):
    phases: Phases = Phases()
    mixture: MixtureConfig = MixtureConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()
    resources: Resources = Resources()
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="older step-* checkpoint dirs are pruned")
    save_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of each phase's exported model (checkpoints keep fp32 masters)"
    )
    verify_checkpoints: bool = Field(
        False, description="hash every trainable tensor on save and check it after resume (gathers each)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _phases_moved(cls, data):
        """Recipes written before the rename put the phases at the top level; say where they go now."""
        if isinstance(data, dict):
            old = [k for k in PHASES if k in data]
            if old:
                raise ValueError(
                    f"train.{old[0]} moved: the training phases now sit under `phases:` "
                    f"(train: {{phases: {{{', '.join(f'{k}: ...' for k in old)}}}}})"
                )
        return data

    def phase(self, name: Phase) -> PhaseConfig:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {list(PHASES)}")
        return getattr(self.phases, name)

    @classmethod
    def smoke(cls, steps: int = 3, **overrides) -> TrainConfig:
        """A few CPU steps on a tiny model: what tests and `make demo` run (well under a minute)."""
        phase = dict(
            steps=steps, warmup_steps=1, batch_size=2, max_seq_len=256, lr=1e-3, loss_chunk_tokens=16
        )
        base = dict(
            phases=Phases(alignment=PhaseConfig(**phase), sft=PhaseConfig(**phase, packing=True)),
            merge=MergeConfig(alpha=0.4, sweep=[0.3, 0.5]),
            resources=Resources(gpu_memory_gib=4.0),
            eval=EvalConfig(heldout_fraction=0.2, max_batches=2, batch_size=4),
            checkpoint_every=max(1, steps // 2),
            device="cpu",
        )
        base.update(overrides)
        return cls(**base)
