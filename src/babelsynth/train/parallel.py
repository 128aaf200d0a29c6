"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training phases, from 1 process to torchrun's N.

- One code path: without torchrun a single-process group (gloo on CPU, NCCL on GPU) is created, so a
  1-process run shards over a world of 1 with the same mixed precision as N processes.
- Memory: the model is built on the meta device (no weight allocated), split into FSDP groups (each
  decoder / vision-encoder layer, the rest in the root), moved to the device empty, and each rank then
  copies only its own shard of every tensor out of the memory-mapped safetensors. No rank ever holds
  the whole model. Trainable parameters are fp32 masters; frozen ones are stored in bf16; compute is
  bf16 with fp32 gradient reduction (MixedPrecisionPolicy).
- Export: every rank gathers one tensor at a time (a collective), rank 0 streams it into safetensors
  under the key names of the checkpoint it was loaded from, so whatever loaded the input loads the
  output. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from babelsynth.train.config import Phase, TrainConfig
from babelsynth.train.loss import LossModel
from babelsynth.train.merge import TensorSource, copy_model_files, write_sharded

log = logging.getLogger(__name__)

TRAINABLE: dict[str, frozenset[str]] = {
    "alignment": frozenset({"connector"}),
    "sft": frozenset({"connector", "llm"}),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def part_of(param_name: str) -> str:
    """'vision' | 'connector' | 'llm' from a parameter name; works for both AyaVision naming schemes."""
    if "vision_tower" in param_name:
        return "vision"
    if "multi_modal_projector" in param_name:
        return "connector"
    return "llm"


# ----------------------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_leader(self) -> bool:
        """One process per node touches the node's scratch directory (downloads, renames, uploads)."""
        return self.local_rank == 0

    def barrier(self) -> None:
        dist.barrier()


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(device_pref: str = "auto") -> Iterator[Dist]:
    """torchrun's group (WORLD_SIZE set) or a private single-process one; reused when already open."""
    device = resolve_device(device_pref)
    created = False
    if not dist.is_initialized():
        # on GPU, CPU tensors (cpu_offload's sharded states) still need collectives: gloo takes those
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    finally:
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- build + load
@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init); buffers stay real, so rotary
    frequencies and position ids computed in __init__ survive."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters[name]
        if p is not None and p.device.type != "meta":  # a meta parameter re-registered (tying) stays itself
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


def file_key_map(model: nn.Module, file_keys: list[str]) -> dict[str, str]:
    """{module parameter name: checkpoint key}, through the class's own checkpoint conversion rules
    (transformers 4.57 saves AyaVision with legacy names: language_model.model.* is
    model.language_model.* in the module)."""
    rules = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    out = {}
    for key in file_keys:
        name = key
        for pattern, repl in rules.items():
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        out[name] = key
    return out


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP groups below the root: every layer transformers can checkpoint (decoder and vision layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def build_sharded(model_dir: str | os.PathLike, phase: Phase, cfg: TrainConfig, d: Dist) -> ShardedModel:
    """The phase's model sharded over the group, trainable set frozen per phase, weights loaded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from transformers import AutoConfig

    pcfg = cfg.phase(phase)
    config = AutoConfig.from_pretrained(str(model_dir))
    with params_on_meta():
        model = _model_class(config).from_config(config, dtype=torch.float32)
    trainable = TRAINABLE[phase]
    names = []
    for name, p in model.named_parameters():
        train = part_of(name) in trainable
        p.requires_grad_(train)
        if train:
            names.append(name)
        else:
            p.data = p.data.to(torch.bfloat16)
    if not names:
        raise ValueError(f"phase {phase!r} found no trainable parameters; is this an AyaVision model?")
    model.train()
    if pcfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = LossModel(model, pcfg.loss_chunk_tokens, always_run_vision=True)

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = (
        CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if cfg.resources.cpu_offload else OffloadPolicy()
    )
    for layer in layer_modules(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp, offload_policy=offload)

    buffers = {n: b.detach().clone() for n, b in wrapper.named_buffers()}
    wrapper.to_empty(device="cpu" if cfg.resources.cpu_offload else d.device)
    with torch.no_grad():
        for n, b in wrapper.named_buffers():
            b.copy_(buffers[n])
    keys = load_shards(model, model_dir)
    return ShardedModel(wrapper, keys, Path(model_dir), names)


@dataclass
class ShardedModel:
    loss_model: nn.Module  # the FSDP root (a LossModel)
    file_keys: dict[str, str]  # module parameter name -> checkpoint key it came from
    source_dir: Path
    trainable: list[str]  # module parameter names

    @property
    def hf(self) -> nn.Module:
        return self.loss_model.model

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.loss_model.parameters() if p.requires_grad]


def load_shards(model: nn.Module, model_dir: str | os.PathLike) -> dict[str, str]:
    """Copy each rank's shard of every parameter from the safetensors (memory-mapped, one tensor at a
    time). Missing and unexpected keys are one error naming them all."""
    from torch.distributed.tensor import DTensor, Shard

    with ExitStack() as stack:
        src = TensorSource(model_dir, stack)
        keys = file_key_map(model, src.keys())
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(keys))
        unused = sorted(k for n, k in keys.items() if n not in params and not _tied_head(model, n))
        if missing or unused:
            raise ValueError(
                f"{model_dir}: checkpoint does not match the model "
                f"(missing {missing[:5]}, unexpected {unused[:5]})"
            )
        with torch.no_grad():
            for name, p in params.items():
                full = src.get(keys[name])
                if isinstance(p, DTensor):
                    if tuple(p.placements) != (Shard(0),):
                        raise RuntimeError(f"{name}: expected FSDP's dim-0 sharding, got {p.placements}")
                    # this rank's rows, cut on the CPU: the full tensor never reaches the GPU
                    parts = full.chunk(p.device_mesh.size(), dim=0)
                    rank = p.device_mesh.get_local_rank()
                    local = p.to_local()
                    if rank < len(parts):
                        local.copy_(parts[rank].to(p.dtype))
                    elif local.numel():
                        raise RuntimeError(
                            f"{name}: rank {rank} has a shard but the tensor has {len(parts)} chunks"
                        )
                else:
                    p.copy_(full.to(p.dtype))
    return {n: k for n, k in keys.items() if n in params}


def _tied_head(model: nn.Module, name: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None
        and out.weight is model.get_input_embeddings().weight
        and name.endswith("lm_head.weight")
    )


# ----------------------------------------------------------------------------------------- export
def export_model(sm: ShardedModel, out_dir: Path, dtype: str, max_shard_bytes: int, d: Dist) -> Path | None:
    """Write the full model as a loadable HF dir (rank 0 only; every rank takes part in the gathers).
    Returns out_dir on rank 0, None elsewhere."""
    from torch.distributed.tensor import DTensor

    from babelsynth.train.merge import TORCH_TO_ST

    target = DTYPES[dtype]
    params = dict(sm.hf.named_parameters())
    order = sorted(params, key=lambda n: sm.file_keys[n])
    entries = [(sm.file_keys[n], TORCH_TO_ST[target], tuple(params[n].shape)) for n in order]
    by_key = {sm.file_keys[n]: params[n] for n in order}

    def produce(key: str) -> torch.Tensor:
        p = by_key[key].detach()
        full = p.full_tensor() if isinstance(p, DTensor) else p
        return full.to("cpu", target).contiguous()

    if not d.main:
        for key, _, _ in entries:
            produce(key)  # the same collectives, in the same order, as rank 0's writer
        return None
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_sharded(tmp, entries, produce, max_shard_bytes)
    copy_model_files(sm.source_dir, tmp, dtype)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
