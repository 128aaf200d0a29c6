"""The two Aya Vision training phases as one recipe (paper §4.2):

- alignment: vision tower and LLM frozen; only the connector (multi_modal_projector) trains.
- sft: connector + LLM train; the vision tower stays frozen.

Checkpoints are written every `checkpoint_every` steps (trainable weights as safetensors, optimizer +
scheduler + RNG as a weights-only torch file, step + data-stream position as JSON) and `run_phase`
resumes from the newest one, so an interrupted run ends bit-identical to an uninterrupted one.
Single process on CPU; under torchrun (WORLD_SIZE > 1) it uses DDP, each rank taking a strided slice
of every global batch, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from babelsynth.train.config import Phase, PhaseConfig, TrainConfig
from babelsynth.train.data import IGNORE_INDEX, BatchStream, MixtureStream, RunData, collate, row_encoder

log = logging.getLogger(__name__)

TRAINABLE: dict[str, frozenset[str]] = {
    "alignment": frozenset({"connector"}),
    "sft": frozenset({"connector", "llm"}),
}
CKPT_DIR, CKPT_WEIGHTS, CKPT_STATE, CKPT_META = (
    "checkpoints",
    "trainable.safetensors",
    "state.pt",
    "trainer_state.json",
)
RESULT_FILE = "phase_result.json"


# ------------------------------------------------------------------------------------------- model parts
def part_of(param_name: str) -> str:
    """'vision' | 'connector' | 'llm' from a parameter name; works for both AyaVision naming schemes."""
    if "vision_tower" in param_name:
        return "vision"
    if "multi_modal_projector" in param_name:
        return "connector"
    return "llm"


def freeze_for_phase(model: torch.nn.Module, phase: Phase) -> list[str]:
    """Set requires_grad per the phase and return the trainable parameter names."""
    if phase not in TRAINABLE:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(TRAINABLE)}")
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in TRAINABLE[phase])
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"phase {phase!r} found no trainable parameters; is this an AyaVision model?")
    return names


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_vlm(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """fp32 master weights; on CUDA the forward runs under bf16 autocast."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device)


def build_optimizer(model: torch.nn.Module, cfg: PhaseConfig) -> torch.optim.AdamW:
    """AdamW over trainable tensors; no weight decay on 1-D tensors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(opt: torch.optim.Optimizer, cfg: PhaseConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled (answer) tokens, and their count. Summing, then
    dividing by the whole batch's count, keeps gradient accumulation exactly equal to one big batch."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    tgt = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        tgt.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((tgt != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    root = Path(out_dir) / CKPT_DIR
    done = sorted(root.glob("step-*")) if root.exists() else []
    return done[-1] if done else None


def save_checkpoint(
    out_dir: Path, step: int, model, opt, sched, stream: BatchStream, meta: dict, keep: int
) -> Path:
    """Write step-NNNNNNN atomically (temp dir + rename), then prune all but the newest `keep`."""
    root = out_dir / CKPT_DIR
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / CKPT_WEIGHTS))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
        tmp / CKPT_STATE,
    )
    (tmp / CKPT_META).write_text(json.dumps({**meta, "step": step, "data": stream.state_dict()}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, opt, sched, stream: BatchStream) -> dict:
    weights = load_file(str(ckpt / CKPT_WEIGHTS))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise ValueError(
            f"checkpoint {ckpt} does not match this phase's trainable set "
            f"(missing {missing[:3]}, unexpected {sorted(set(weights) - set(params))[:3]})"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = torch.load(ckpt / CKPT_STATE, weights_only=True, map_location="cpu")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    meta = json.loads((ckpt / CKPT_META).read_text())
    stream.load_state_dict(meta["data"])
    return meta


# ------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------- the recipe
@dataclass
class PhaseResult:
    phase: str
    out_dir: str
    steps: int
    completed: bool
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)  # losses of the steps run in this call
    final_loss: float | None = None
    skipped_examples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def run_phase(
    model,
    phase: Phase,
    *,
    processor,
    run_uri: str,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    stop_after: int | None = None,
) -> PhaseResult:
    """Train `model` in place for cfg.phases.<phase>.steps optimizer steps on the run's training split,
    resuming from out_dir/checkpoints if present. On completion the full model and processor are
    saved to out_dir (a loadable HF dir). `stop_after` ends the call after that many steps without a
    final save (used to test preemption)."""
    pcfg = cfg.phase(phase)
    out = Path(out_dir)
    device = next(model.parameters()).device
    dist = _dist_setup(device)
    if pcfg.batch_size % dist.world:
        raise ValueError(f"batch_size {pcfg.batch_size} must be a multiple of WORLD_SIZE {dist.world}")
    freeze_for_phase(model, phase)
    model.train()
    torch.manual_seed(pcfg.seed)

    data = RunData(run_uri)
    encode = row_encoder(processor, data.images, pcfg.max_seq_len)
    stream = BatchStream(
        MixtureStream(data, encode, cfg.mixture, pcfg.seed, cfg.eval.heldout_fraction),
        pcfg.batch_size,
        pcfg.max_seq_len,
        pcfg.packing,
    )
    opt = build_optimizer(model, pcfg)
    sched = build_scheduler(opt, pcfg)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id

    step, resumed, last_loss = 0, None, None
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        ck = load_checkpoint(ckpt, model, opt, sched, stream)
        step = resumed = ck["step"]
        last_loss = ck.get("loss")
        log.info("%s: resumed from %s (step %d)", phase, ckpt, step)

    wrapped = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )  # text-only micro-batches leave the connector unused
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    meta = {"phase": phase, "config": pcfg.model_dump(mode="json")}
    result = PhaseResult(phase, str(out), step, completed=False, resumed_from=resumed)

    ran = 0
    while step < pcfg.steps and (stop_after is None or ran < stop_after):
        rows = stream.next_rows()[dist.rank :: dist.world]
        micro = [
            collate(rows[i : i + pcfg.micro], pad_id, pcfg.packing) for i in range(0, len(rows), pcfg.micro)
        ]
        n_tokens = torch.tensor(
            sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro),
            dtype=torch.float64,
            device=device,
        )
        if dist.world > 1:
            torch.distributed.all_reduce(n_tokens)
        # DDP averages gradients over ranks, so scale by world / global_tokens to get a per-token mean
        scale = dist.world / max(float(n_tokens), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, cpu_mb in enumerate(micro):
            mb = {k: v.to(device) for k, v in cpu_mb.items()}
            sync = dist.world == 1 or i == len(micro) - 1
            with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast:
                s, _ = token_loss_sum(wrapped, mb)
                (s * scale).backward()
            loss_sum += s.detach().double()
        if dist.world > 1:
            torch.distributed.all_reduce(loss_sum)
        if pcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], pcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, ran = step + 1, ran + 1
        loss = float(loss_sum) / max(float(n_tokens), 1.0)
        result.losses.append(loss)
        log.info("%s step %d/%d loss %.4f lr %.3g", phase, step, pcfg.steps, loss, sched.get_last_lr()[0])
        if step % cfg.checkpoint_every == 0 or step == pcfg.steps:
            if dist.main:
                save_checkpoint(
                    out, step, model, opt, sched, stream, {**meta, "loss": loss}, cfg.keep_checkpoints
                )
            _barrier(dist)

    result.steps, result.skipped_examples = step, stream.examples.skipped
    result.final_loss = result.losses[-1] if result.losses else last_loss
    if step >= pcfg.steps:
        result.completed = True
        if dist.main:
            model.save_pretrained(out, safe_serialization=True)
            processor.save_pretrained(out)
            (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))
        _barrier(dist)
    return result
