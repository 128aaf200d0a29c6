"""Sharded, world-size-independent checkpoints of a training phase (torch.distributed.checkpoint).

What is saved: the trainable parameters (fp32 masters) and AdamW's state, each rank writing its own
shard (no rank gathers the model), keyed by parameter name, so a checkpoint written by N processes loads
into M (DCP reshards on load). Beside them, rank 0 writes the scheduler, RNG and data-stream position
(trainer_state.json, the marker uploaded last) and, with `verify_checkpoints`, a sha256 of every full
trainable tensor and optimizer moment, checked after a resume.

Frozen parameters are not saved: they are re-read from the phase's input model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from babelsynth.train.outputs import Outputs
from babelsynth.train.parallel import Dist, ShardedModel

log = logging.getLogger(__name__)

CKPT_ROOT, STATE_FILE, RNG_FILE = "checkpoints", "trainer_state.json", "rng.pt"


def step_rel(phase: str, step: int) -> str:
    return f"{CKPT_ROOT}/{phase}/step-{step:07d}"


def _steps(names: list[str]) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("step-") and n[5:].isdigit())


def local_steps(out: Outputs, phase: str) -> list[int]:
    root = out.local(f"{CKPT_ROOT}/{phase}")
    names = [p.name for p in root.iterdir() if (p / STATE_FILE).exists()] if root.is_dir() else []
    return _steps(names)


def remote_steps(out: Outputs, phase: str) -> list[int]:
    done = {f.split("/")[0] for f in out.remote_files(f"{CKPT_ROOT}/{phase}") if f.endswith("/" + STATE_FILE)}
    return _steps(sorted(done))


def _model_state(sm: ShardedModel) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    keep = {f"model.{n}" for n in sm.trainable}
    return {k: v for k, v in get_model_state_dict(sm.loss_model).items() if k in keep}


def _optim_state(sm: ShardedModel, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(sm.loss_model, opt)


def _sha(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def digests(sm: ShardedModel, opt, d: Dist) -> dict[str, str] | None:
    """sha256 of every full trainable tensor and optimizer state tensor (gathered one at a time on every
    rank; rank 0 hashes). World-size independent, so 2-process and 1-process states compare."""
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    out: dict[str, str] = {}
    for k, v in sorted(_model_state(sm).items()):
        t = full(v)
        if d.main:
            out[f"param/{k}"] = _sha(t)
    for k, st in sorted(_optim_state(sm, opt)["state"].items()):
        for name, v in sorted(st.items()):
            if isinstance(v, torch.Tensor):
                t = full(v)
                if d.main:
                    out[f"optim/{k}/{name}"] = _sha(t)
    return out if d.main else None


def save(
    out: Outputs,
    phase: str,
    step: int,
    sm: ShardedModel,
    opt,
    sched,
    stream,
    meta: dict,
    d: Dist,
    keep: int,
    verify: bool,
) -> str:
    """Write step-NNNNNNN to scratch (temp dir + rename), upload it (marker last), prune older ones."""
    import torch.distributed.checkpoint as dcp

    rel = step_rel(phase, step)
    final = out.local(rel)
    tmp = final.with_name(f".tmp-{final.name}")
    if d.node_leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    dcp.save({"model": _model_state(sm), "optim": _optim_state(sm, opt)}, checkpoint_id=str(tmp))
    sums = digests(sm, opt, d) if verify else None
    if d.main:
        torch.save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
        state = {
            **meta,
            "step": step,
            "world": d.world,
            "data": stream.state_dict(),
            "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
            "digests": sums,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    d.barrier()
    if d.node_leader:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        out.upload_dir(rel, skip=(STATE_FILE,))  # every node uploads its ranks' shards
    d.barrier()
    if d.main:
        out.upload_dir(rel, last=STATE_FILE, skip=tuple(_files(final, STATE_FILE)))  # the marker
        for old in remote_steps(out, phase)[:-keep]:
            out.delete_remote(step_rel(phase, old), marker=STATE_FILE)
    if d.node_leader:
        for old in local_steps(out, phase)[:-keep]:
            shutil.rmtree(out.local(step_rel(phase, old)), ignore_errors=True)
    d.barrier()
    return out.remote(rel)


def _files(root: Path, but: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != but]


def latest(out: Outputs, phase: str, d: Dist) -> Path | None:
    """The newest complete checkpoint, local or uploaded (rank 0 decides, every rank agrees), made
    present in every node's scratch."""
    choice = [None]
    if d.main:
        steps = set(local_steps(out, phase)) | set(remote_steps(out, phase))
        choice = [max(steps) if steps else None]
    dist.broadcast_object_list(choice, src=0)
    step = choice[0]
    if step is None:
        return None
    rel = step_rel(phase, step)
    if d.node_leader and not (out.local(rel) / STATE_FILE).exists():
        log.info("%s: downloading checkpoint %s", phase, out.remote(rel))
        out.download_dir(rel)
    d.barrier()
    return out.local(rel)


def load(ckpt: Path, sm: ShardedModel, opt, sched, stream, d: Dist, verify: bool) -> dict:
    """Restore weights, AdamW state, scheduler, RNG and data position; with `verify`, prove the restored
    tensors are the saved ones bit for bit (whatever the world size of either run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": _model_state(sm), "optim": _optim_state(sm, opt)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(sm.loss_model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(sm.loss_model, opt, optim_state_dict=state["optim"])
    meta = json.loads((ckpt / STATE_FILE).read_text())
    torch.set_rng_state(torch.load(ckpt / RNG_FILE, weights_only=True)["torch"])
    sched.load_state_dict({**sched.state_dict(), **meta["scheduler"]})
    stream.load_state_dict(meta["data"])
    meta["verified"] = None
    if verify and meta.get("digests"):
        got = digests(sm, opt, d)
        ok = [got == meta["digests"]] if d.main else [None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:
            raise RuntimeError(f"{ckpt}: restored tensors differ from the saved ones (verify_checkpoints)")
        meta["verified"] = True
    return meta
