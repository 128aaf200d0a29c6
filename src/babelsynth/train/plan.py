"""Memory planner: per-rank bytes of a recipe on a world size, from config.json alone (no weight is read).

`babelsynth train --plan` prints it, and every training run checks it first: a phase that cannot fit is
refused before any weight is loaded, with the setting to change. The model is what `train.sft` does:

- FSDP2 over `world` ranks. Trainable parameters keep fp32 master weights (4 B/param), fp32 gradients
  (4 B) and AdamW's two fp32 moments (8 B), all sharded: 16 B / world per trainable parameter. Frozen
  parameters are stored in bf16 (2 B / world). `cpu_offload` moves all of that to host RAM.
- Compute is bf16 (FSDP2 MixedPrecisionPolicy). Each decoder and vision-encoder layer is its own FSDP
  group; with prefetch two layers are gathered at once (2 B/param each), and a trainable layer's bf16
  gradient plus its fp32 reduce-scatter input (2 + 4 B/param) exist while it is reduced. Everything else
  (embedding = tied LM head, final norm, vision embeddings, connector) is the root group, gathered for
  the whole step, with its gradients unsharded until the step's last reduce-scatter.
- Activations of one micro-batch of T = micro_batch_size x max_seq_len tokens. With activation
  checkpointing each decoder layer keeps its bf16 input (T x d x 2 B) and one layer at a time is
  recomputed: the tensors autograd saves in a Cohere-style layer, per token, are
  c = 2d (input, norm output) + 3 q_dim (q, rotated q, attention output) + 3 kv_dim (k, rotated k, v)
  + 4 I (gate, up, act(gate), product), times 2 B, doubled for the gradients alive in its backward.
  Without checkpointing every layer keeps its c.
- The loss: one chunk of `loss_chunk_tokens` logits over the vocabulary alive at a time, 12 B per logit
  (bf16 logits, fp32 upcast, fp32 softmax gradient, bf16 gradient).
- The vision tower is frozen and runs without autograd: only one layer's working set for the tiles of a
  micro-batch (at most T / tokens_per_tile tiles): n_patches x (4 hv + Iv) x 2 B per tile.

Figures are estimates of the large terms, not of allocator behaviour; `reserve_fraction` of each GPU is
never planned. docs/training.md has the 8B and 32B figures with the arithmetic.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from babelsynth.train.config import PHASES, Phase, PhaseConfig, Resources, TrainConfig

GIB = 1 << 30
TRAINABLE_BYTES = {"weights": 4, "grads": 4, "optimizer": 8}  # fp32 master, fp32 grad, AdamW m + v
FROZEN_BYTES = 2  # bf16
COMPUTE_BYTES = 2  # bf16 activations and gathered weights
LOGIT_BYTES = 12


class PlanError(ValueError):
    """A phase does not fit; the message names the setting to change."""


@dataclass(frozen=True)
class ModelDims:
    """What the planner needs from an Aya-Vision-style config.json (text LM + SigLIP tower + connector)."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    norms_per_layer: int
    norm_bias: bool
    qk_norm: bool
    attention_bias: bool
    v_hidden: int = 0
    v_layers: int = 0
    v_intermediate: int = 0
    v_patch: int = 14
    v_image: int = 0
    v_channels: int = 3
    downsample: int = 2
    connector_intermediate: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def patches(self) -> int:
        return (self.v_image // self.v_patch) ** 2 if self.v_hidden else 0

    @property
    def tokens_per_tile(self) -> int:
        return self.patches // self.downsample**2 if self.v_hidden else 0


def dims_from_config(cfg: dict) -> ModelDims:
    """ModelDims from a VLM config.json (text_config + vision_config) or a text LM's config.json."""
    text = cfg.get("text_config", cfg)
    mt = text.get("model_type", "")
    if mt not in ("cohere", "cohere2", "llama", "mistral", "qwen2"):
        raise PlanError(f"the memory planner has no layer model for text model_type {mt!r}")
    heads = text["num_attention_heads"]
    out = dict(
        model_type=mt,
        vocab=text["vocab_size"],
        hidden=text["hidden_size"],
        layers=text["num_hidden_layers"],
        intermediate=text["intermediate_size"],
        heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        tied=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
        norms_per_layer=1 if mt.startswith("cohere") else 2,  # Cohere: one norm, parallel attention + MLP
        norm_bias=False,
        qk_norm=bool(text.get("use_qk_norm", False)),
        attention_bias=bool(text.get("attention_bias", False)),
    )
    vision = cfg.get("vision_config")
    if vision:
        if vision.get("vision_use_head"):
            raise PlanError("the memory planner does not model the SigLIP pooling head (vision_use_head)")
        out.update(
            v_hidden=vision["hidden_size"],
            v_layers=vision["num_hidden_layers"],
            v_intermediate=vision["intermediate_size"],
            v_patch=vision["patch_size"],
            v_image=vision["image_size"],
            v_channels=vision.get("num_channels", 3),
            downsample=cfg.get("downsample_factor", 2),
            connector_intermediate=cfg.get("alignment_intermediate_size") or text["hidden_size"],
        )
    return ModelDims(**out)


def read_dims(model_dir: str | Path) -> ModelDims:
    """Reads only <model_dir>/config.json: planning must never touch the weights."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise PlanError(f"{path} not found: the planner needs the model's config.json")
    return dims_from_config(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------- parameter counts
def decoder_layer_params(d: ModelDims) -> int:
    attn = d.hidden * d.q_dim + 2 * d.hidden * d.kv_dim + d.q_dim * d.hidden
    if d.attention_bias:
        attn += d.q_dim + 2 * d.kv_dim + d.hidden
    if d.qk_norm:
        attn += d.q_dim + d.kv_dim
    mlp = 3 * d.hidden * d.intermediate
    norms = d.norms_per_layer * d.hidden * (2 if d.norm_bias else 1)
    return attn + mlp + norms


def vision_layer_params(d: ModelDims) -> int:
    h, i = d.v_hidden, d.v_intermediate
    return 2 * (2 * h) + 4 * (h * h + h) + (h * i + i) + (i * h + h) if h else 0


def param_counts(d: ModelDims) -> dict[str, int]:
    """{llm, llm_layer, llm_root, vision, vision_layer, vision_root, connector}: exact for the supported
    architectures (a test checks them against the tiny model's parameter count)."""
    embed = d.vocab * d.hidden * (1 if d.tied else 2)
    llm_root = embed + d.hidden * (2 if d.norm_bias else 1)
    out = {"llm_layer": decoder_layer_params(d), "llm_root": llm_root}
    out["llm"] = llm_root + d.layers * out["llm_layer"]
    if d.v_hidden:
        h = d.v_hidden
        emb = d.v_channels * d.v_patch**2 * h + h + d.patches * h
        out["vision_layer"] = vision_layer_params(d)
        out["vision_root"] = emb + 2 * h  # patch + position embeddings, post-layernorm
        out["vision"] = out["vision_root"] + d.v_layers * out["vision_layer"]
        c_in = h * d.downsample**2
        ai = d.connector_intermediate
        out["connector"] = 2 * c_in + (c_in * ai + ai) + (ai // 2 * d.hidden + d.hidden)
    else:
        out.update(vision_layer=0, vision_root=0, vision=0, connector=0)
    return out


# ----------------------------------------------------------------------------------------- the plan
@dataclass
class PhasePlan:
    phase: str
    world: int
    trainable_params: int
    frozen_params: int
    tokens_per_micro_batch: int
    accumulation_steps: int
    gpu: dict[str, int] = field(default_factory=dict)  # bytes per rank, by component
    host: dict[str, int] = field(default_factory=dict)  # bytes per rank kept in host RAM (cpu_offload)
    usable: int = 0
    hint: str | None = None

    @property
    def total(self) -> int:
        return sum(self.gpu.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def plan_phase(dims: ModelDims, phase: Phase, pcfg: PhaseConfig, res: Resources) -> PhasePlan:
    counts = param_counts(dims)
    n = res.world
    trainable_parts = {"alignment": ("connector",), "sft": ("connector", "llm")}[phase]
    p_train = sum(counts[k] for k in trainable_parts)
    p_frozen = counts["llm"] + counts["vision"] + counts["connector"] - p_train
    micro = pcfg.micro_for(n)
    tokens = micro * pcfg.max_seq_len
    plan = PhasePlan(
        phase=phase,
        world=n,
        trainable_params=p_train,
        frozen_params=p_frozen,
        tokens_per_micro_batch=tokens,
        accumulation_steps=pcfg.rows_per_rank(n) // micro,
    )
    sharded = {
        "weights": (TRAINABLE_BYTES["weights"] * p_train + FROZEN_BYTES * p_frozen) // n,
        "grads": TRAINABLE_BYTES["grads"] * p_train // n,
        "optimizer": TRAINABLE_BYTES["optimizer"] * p_train // n,
    }
    if res.cpu_offload:
        plan.host = sharded
    else:
        plan.gpu.update(sharded)

    # root group: gathered for the whole step; its trainable part's grads unsharded until reduced
    root = counts["llm_root"] + counts["vision_root"] + counts["connector"]
    root_train = counts["connector"] + (counts["llm_root"] if phase == "sft" else 0)
    layer = max(counts["llm_layer"], counts["vision_layer"])
    layer_train = counts["llm_layer"] if phase == "sft" else 0
    plan.gpu["gathered_weights"] = COMPUTE_BYTES * (root + 2 * layer)
    plan.gpu["unsharded_grads"] = (COMPUTE_BYTES + 4) * (root_train + layer_train)

    per_token = (2 * dims.hidden + 3 * dims.q_dim + 3 * dims.kv_dim + 4 * dims.intermediate) * COMPUTE_BYTES
    if pcfg.activation_checkpointing:
        act = dims.layers * tokens * dims.hidden * COMPUTE_BYTES + 2 * tokens * per_token
    else:
        act = dims.layers * tokens * per_token
    plan.gpu["activations"] = act
    plan.gpu["logits"] = min(pcfg.loss_chunk_tokens, tokens) * dims.vocab * LOGIT_BYTES
    if dims.v_hidden:
        tiles = tokens // max(dims.tokens_per_tile, 1)
        plan.gpu["vision"] = tiles * dims.patches * (4 * dims.v_hidden + dims.v_intermediate) * COMPUTE_BYTES
    plan.usable = int(res.gpu_memory_gib * (1 - res.reserve_fraction) * GIB)
    if not plan.fits:
        plan.hint = _hint(plan, phase, pcfg, res, sum(sharded.values()))
    return plan


def _hint(plan: PhasePlan, phase: str, pcfg: PhaseConfig, res: Resources, sharded: int) -> str:
    """The setting to change: more ranks when the sharded states dominate, else the micro-batch."""
    per_step = plan.total - (0 if res.cpu_offload else sharded)
    where = f"train.phases.{phase}"
    head = (
        f"phase {phase} needs {plan.total / GIB:.1f} GiB per rank but {res.world} x "
        f"{res.gpu_memory_gib:g} GiB leaves {plan.usable / GIB:.1f} GiB usable "
        f"(reserve_fraction {res.reserve_fraction:g})"
    )
    if per_step < plan.usable and not res.cpu_offload:
        need = math.ceil(sharded * res.world / (plan.usable - per_step))
        return (
            f"{head}; the sharded weights/grads/AdamW state ({sharded / GIB:.1f} GiB per rank) dominate: "
            f"set resources.nproc_per_node x resources.nnodes to at least {need} (now {res.world}), "
            f"or resources.cpu_offload: true"
        )
    fixes = []
    if pcfg.micro_batch_size > 1:
        fixes.append(f"lower {where}.micro_batch_size (now {pcfg.micro_batch_size})")
    if not pcfg.activation_checkpointing:
        fixes.append(f"set {where}.activation_checkpointing: true")
    if pcfg.loss_chunk_tokens > 1024:
        fixes.append(f"lower {where}.loss_chunk_tokens (now {pcfg.loss_chunk_tokens})")
    fixes.append(f"lower {where}.max_seq_len (now {pcfg.max_seq_len})")
    return f"{head}; one micro-batch's activations and buffers dominate: " + ", or ".join(fixes)


@dataclass
class RecipePlan:
    dims: ModelDims
    params: dict[str, int]
    resources: Resources
    phases: dict[str, PhasePlan]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases.values())

    def check(self) -> None:
        bad = [p.hint for p in self.phases.values() if not p.fits]
        if bad:
            raise PlanError(
                "the recipe does not fit in memory, refusing before loading weights:\n  " + "\n  ".join(bad)
            )

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "resources": self.resources.model_dump(),
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
        }


def plan_recipe(dims: ModelDims, cfg: TrainConfig) -> RecipePlan:
    return RecipePlan(
        dims,
        param_counts(dims),
        cfg.resources,
        {ph: plan_phase(dims, ph, cfg.phase(ph), cfg.resources) for ph in PHASES},
    )


def format_plan(plan: RecipePlan) -> str:
    """The table `babelsynth train --plan` prints (GiB per rank)."""
    r = plan.resources
    p = plan.params
    lines = [
        f"model: {plan.dims.model_type} LLM {p['llm'] / 1e9:.2f} B params, vision {p['vision'] / 1e9:.2f} B, "
        f"connector {p['connector'] / 1e9:.3f} B",
        f"world: {r.nnodes} node(s) x {r.nproc_per_node} = {r.world} ranks, {r.gpu_memory_gib:g} GiB each, "
        f"{r.reserve_fraction:.0%} reserved" + (", cpu_offload" if r.cpu_offload else ""),
    ]
    comps = [
        "weights",
        "grads",
        "optimizer",
        "gathered_weights",
        "unsharded_grads",
        "activations",
        "logits",
        "vision",
    ]
    head = f"{'GiB per rank':<18}" + "".join(f"{c:>18}" for c in plan.phases)
    lines += ["", head]
    for c in comps:
        row = f"{c:<18}"
        for ph in plan.phases.values():
            v = ph.gpu.get(c)
            v = ph.host.get(c) if v is None and c in ph.host else v
            tag = " (host)" if c in ph.host else ""
            row += f"{'-' if v is None else f'{v / GIB:.2f}{tag}':>18}"
        lines.append(row)
    lines.append(f"{'total (GPU)':<18}" + "".join(f"{ph.total / GIB:>18.2f}" for ph in plan.phases.values()))
    lines.append(f"{'usable':<18}" + "".join(f"{ph.usable / GIB:>18.2f}" for ph in plan.phases.values()))
    if r.cpu_offload:
        lines.append(
            f"{'host RAM per node':<18}"
            + "".join(
                f"{sum(ph.host.values()) * r.nproc_per_node / GIB:>18.2f}" for ph in plan.phases.values()
            )
        )
    lines.append(
        f"{'tokens/micro-batch':<18}"
        + "".join(f"{ph.tokens_per_micro_batch:>18}" for ph in plan.phases.values())
    )
    lines.append(
        f"{'accumulation':<18}" + "".join(f"{ph.accumulation_steps:>18}" for ph in plan.phases.values())
    )
    lines.append(
        f"{'fits':<18}" + "".join(f"{'yes' if ph.fits else 'NO':>18}" for ph in plan.phases.values())
    )
    lines += [f"  {ph.hint}" for ph in plan.phases.values() if ph.hint]
    return "\n".join(lines)
