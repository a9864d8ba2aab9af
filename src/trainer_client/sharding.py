"""Fully sharded data parallel training (`--sharding fsdp`): torch's FSDP2 (`fully_shard`).

Each process keeps 1/N of the student's parameters, gradients and optimizer state; a layer's
full weights exist only while it runs. Every decoder layer (the classes a transformers model
lists in `_no_split_modules`) is its own unit, then the root holds the rest (embeddings, final
norm, output head). The root keeps its weights gathered after the forward pass (FSDP2's default
for the root), which is what lets the loss apply the output head to the hidden states in chunks
outside the model's forward.

It runs on CPU over gloo and on GPUs over NCCL, launched by `torchrun` like data parallelism.
Checkpoints and `final/` hold full weights (gathered by every process, written by the first), so
a sharded run's files read as any other run's; resuming loads them back into the shards.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from potstill.usage import UsageError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_student(model: torch.nn.Module, device: torch.device, processes: int) -> torch.nn.Module:
    """`model` sharded in place over `processes` (every decoder layer, then the root)."""
    if not torch.distributed.is_initialized():
        raise UsageError("--sharding fsdp shards over the processes of a distributed launch: "
                         "torchrun --nproc-per-node N -m potstill.cli train ... --sharding fsdp")
    mesh = init_device_mesh(device.type, (processes,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): it cannot be sharded")
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole on the CPU (a collective: every process calls it)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state gathered whole, keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Each process takes its shards of the full `state` (every process passes the same)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
