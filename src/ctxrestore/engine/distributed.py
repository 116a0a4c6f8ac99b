"""Devices and torchrun: read the launcher's variables once into one small object.

A plain `python`/`ctxrestore` run is world size 1. Under `torchrun --nproc_per_node N` each
process joins a process group: NCCL on GPUs, gloo on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ctxrestore.errors import CtxRestoreError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when present, else CPU; under torchrun each process takes its own GPU."""
    if device not in DEVICES:
        raise CtxRestoreError(f"device '{device}' is not one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CtxRestoreError("device 'cuda' was asked for but no CUDA GPU is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join torchrun's process group if launched by it; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistributedContext(rank, local_rank, world_size, resolved)


def teardown_distributed(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (the value itself on one process)."""
    if not context.is_distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def broadcast_object(obj: object, context: DistributedContext) -> object:
    """Rank 0's `obj` on every process (e.g. a decision made after reading files)."""
    if not context.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
