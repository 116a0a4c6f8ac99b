"""Devices and torchrun: read the launcher's variables once into one small object.

A plain `python`/`ctxrestore` run is world size 1. Under `torchrun --nproc_per_node N` each
process joins a process group (NCCL on GPUs, gloo on CPU) once, and keeps it for every run it
makes: a benchmark pretrains and fine-tunes many times in one process, and torchrun's
rendezvous cannot be joined a second time after the group is destroyed (gloo then connects to
the first group's closed ports). Only rank 0 reads and writes run folders; `on_main` hands its
decisions, and its errors, to the other ranks.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ctxrestore.errors import CtxRestoreError
from ctxrestore.launcher import launched_rank

DEVICES = ("auto", "cpu", "cuda")
# How long a rank waits in a collective. The others wait while rank 0 alone tests a fine-tuned
# network, writes its report or probes pretrainings: minutes on large 3D data, past NCCL's
# default of 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
T = TypeVar("T")


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
    """Join torchrun's process group if launched by it (once per process; it is left at
    exit); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if resolved.type == "cuda":
                torch.cuda.set_device(resolved)
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
            atexit.register(_leave_process_group)
        elif dist.get_backend() != backend:
            raise CtxRestoreError(
                f"this process already runs on {dist.get_backend()}; a run on device "
                f"'{resolved.type}' needs {backend}: use one device for every run of a torchrun"
            )
    return DistributedContext(rank, local_rank, world_size, resolved)


def _leave_process_group() -> None:
    if dist.is_initialized():
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


def on_main(context: DistributedContext, function: Callable[..., T], *args, **kwargs) -> T:
    """`function` run on rank 0 only, its result handed to every rank. A CtxRestoreError it
    raises is raised on every rank, so no rank waits for one that has stopped."""
    outcome: tuple[bool, object] = (True, None)
    if context.is_main:
        try:
            outcome = (True, function(*args, **kwargs))
        except CtxRestoreError as error:
            outcome = (False, str(error))
    succeeded, value = broadcast_object(outcome, context)
    if not succeeded:
        raise CtxRestoreError(value)
    return value
