"""The two Aya Vision training phases as one recipe (paper §4.2), run by 1 process or N under torchrun:

- alignment: vision tower and LLM frozen; only the connector (multi_modal_projector) trains.
- sft: connector + LLM train; the vision tower stays frozen.

Each phase starts from a model dir (alignment: the VLM; sft: alignment's export), sharded with FSDP2
(`train.parallel`): bf16 compute over fp32 masters, activation checkpointing, the chunked loss of
`train.loss`. A step splits the global batch across ranks (rank r takes rows r, r+N, ...), each rank
splits its share into micro-batches of `micro_batch_size` rows and accumulates. Checkpoints
(`train.checkpoint`) are sharded and world-size independent, uploaded to the output URI as they are
written, and `run_phase` resumes from the newest one: an interrupted run ends bit-identical to an
uninterrupted one on the same world size. When the phase completes its model is exported (rank 0 writes)
and uploaded; a completed phase is never trained again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from babelsynth.train import checkpoint
from babelsynth.train.config import Phase, PhaseConfig, TrainConfig
from babelsynth.train.data import IGNORE_INDEX, BatchStream, MixtureStream, RunData, collate, row_encoder
from babelsynth.train.outputs import Outputs
from babelsynth.train.parallel import Dist, build_sharded, export_model

log = logging.getLogger(__name__)

RESULT_FILE = "phase_result.json"


def build_optimizer(params: list[torch.nn.Parameter], cfg: PhaseConfig) -> torch.optim.AdamW:
    """AdamW over trainable tensors; no weight decay on 1-D tensors (norms, biases)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(opt: torch.optim.Optimizer, cfg: PhaseConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)


@dataclass
class PhaseResult:
    phase: str
    out_dir: str  # the exported model under the output URI
    local_dir: str  # the same model in this node's scratch
    steps: int
    completed: bool
    world: int = 1
    resumed_from: int | None = None
    resume_verified: bool | None = None
    ran: int = 0  # optimizer steps run in this call
    losses: list[float] = field(default_factory=list)  # losses of the steps run in this call
    final_loss: float | None = None
    skipped_for_length: int = 0  # rows whose prompt (with image tokens) exceeds max_seq_len
    truncated_answers: int = 0  # rows whose answer was cut at max_seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def _stream(phase: Phase, processor, run_uri: str, cfg: TrainConfig) -> BatchStream:
    pcfg = cfg.phase(phase)
    data = RunData(run_uri)
    encode = row_encoder(processor, data.images, pcfg.max_seq_len)
    return BatchStream(
        MixtureStream(data, encode, cfg.mixture, pcfg.seed, cfg.eval.heldout_fraction),
        pcfg.batch_size,
        pcfg.max_seq_len,
        pcfg.packing,
    )


def finished(out: Outputs, phase: Phase, d: Dist) -> PhaseResult | None:
    """The result of a phase already completed and uploaded, with its model present in local scratch."""
    doc = out.read_remote_json(f"{phase}/{RESULT_FILE}") if d.main else None
    box = [doc]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    if d.node_leader and not (out.local(phase) / RESULT_FILE).exists():
        out.download_dir(phase)
    d.barrier()
    res = PhaseResult(**{**box[0], "local_dir": str(out.local(phase)), "ran": 0, "losses": []})
    return res


def run_phase(
    phase: Phase,
    *,
    src_dir: str | os.PathLike,
    processor,
    run_uri: str,
    cfg: TrainConfig,
    out: Outputs,
    d: Dist,
    stop_after: int | None = None,
) -> PhaseResult:
    """Train phase `phase` from `src_dir` for cfg.phases.<phase>.steps optimizer steps, resuming from
    the newest checkpoint; `stop_after` ends this call after that many steps with a checkpoint (a
    time-boxed slot; run again to continue)."""
    done = finished(out, phase, d)
    if done is not None:
        log.info("%s: already completed (%s)", phase, done.out_dir)
        return done
    pcfg = cfg.phase(phase)
    micro = pcfg.micro_for(d.world)
    torch.manual_seed(pcfg.seed)
    sm = build_sharded(src_dir, phase, cfg, d)
    stream = _stream(phase, processor, run_uri, cfg)
    params = sm.trainable_params()
    opt = build_optimizer(params, pcfg)
    sched = build_scheduler(opt, pcfg)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    meta = {"phase": phase, "config": pcfg.model_dump(mode="json")}
    result = PhaseResult(phase, out.remote(phase), str(out.local(phase)), 0, completed=False, world=d.world)

    step = 0
    ckpt = checkpoint.latest(out, phase, d)
    if ckpt is not None:
        ck = checkpoint.load(ckpt, sm, opt, sched, stream, d, cfg.verify_checkpoints)
        step = result.resumed_from = ck["step"]
        result.resume_verified = ck["verified"]
        result.final_loss = ck.get("loss")
        log.info("%s: resumed from %s (step %d, saved by %d ranks)", phase, ckpt, step, ck.get("world", 1))

    device = d.device
    last_saved = step
    while step < pcfg.steps and (stop_after is None or result.ran < stop_after):
        rows = stream.next_rows()[d.rank :: d.world]
        batches = [collate(rows[i : i + micro], pad_id, pcfg.packing) for i in range(0, len(rows), micro)]
        n_tokens = torch.tensor(
            float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)),
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(n_tokens)
        # FSDP averages gradients over ranks: world / global tokens makes the step a per-token mean
        scale = d.world / max(float(n_tokens), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in batches:
            s, _ = sm.loss_model(**{k: v.to(device) for k, v in b.items()})
            (s * scale).backward()
            loss_sum += s.detach().double()
        dist.all_reduce(loss_sum)
        if pcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, pcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        result.ran += 1
        loss = float(loss_sum) / max(float(n_tokens), 1.0)
        result.losses.append(loss)
        result.final_loss = loss
        if d.main:
            log.info("%s step %d/%d loss %.4f lr %.3g", phase, step, pcfg.steps, loss, sched.get_last_lr()[0])
        stopping = stop_after is not None and result.ran >= stop_after
        if step % cfg.checkpoint_every == 0 or step == pcfg.steps or stopping:
            checkpoint.save(
                out,
                phase,
                step,
                sm,
                opt,
                sched,
                stream,
                {**meta, "loss": loss},
                d,
                cfg.keep_checkpoints,
                cfg.verify_checkpoints,
            )
            last_saved = step

    result.steps = step
    result.skipped_for_length = stream.examples.skipped
    result.truncated_answers = stream.examples.truncated
    if step >= pcfg.steps:
        result.completed = True
        local = export_model(sm, out.local(phase), cfg.save_dtype, cfg.merge.max_shard_bytes, d)
        if d.main:
            (local / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))
            out.upload_dir(phase, last=RESULT_FILE)
        d.barrier()
        if d.node_leader and not d.main and not (out.local(phase) / RESULT_FILE).exists():
            out.download_dir(phase)  # other nodes need the model for the next phase
        d.barrier()
    elif last_saved != step:
        raise RuntimeError(f"{phase}: stopped at step {step} without a checkpoint")
    del sm, opt
    return result
