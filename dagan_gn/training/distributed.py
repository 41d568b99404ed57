"""Multi-process training with ``torchrun``: process group, DDP wrapping, rank-0-only side effects.

``torchrun --nproc_per_node K -m dagan_gn.cli train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous address); :func:`init_distributed` reads them and starts an NCCL (CUDA) or gloo (CPU) process group.
Without those variables everything here is a no-op and training runs in one process.

The gradient penalty differentiates the critic twice (``create_graph=True``). That works through DDP because
``torch.autograd.grad`` with respect to the interpolated *inputs* does not touch the parameters' gradient
accumulators: DDP's all-reduce hooks fire once, in the final ``backward`` of the critic loss, which carries both the
first-order and the penalty terms. During the generator step the trainer calls the *bare* critic (its parameters are
frozen there and must not be all-reduced), and fakes for critic steps come from the bare generator under
``no_grad``, so every DDP forward is followed by exactly one backward.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_ddp", "unwrap", "all_gather_objects", "barrier", "cleanup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``is_main`` does logging and checkpoints."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group from torchrun's environment variables (no-op for a single process).

    On CUDA each process takes ``cuda:LOCAL_RANK``; the caller should move its models to :func:`process_device`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under multi-GPU, else ``device`` unchanged."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel when running distributed (else return ``module``)."""
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)  # buffers (BN statistics) follow rank 0 by default


def unwrap(module: nn.Module) -> nn.Module:
    """The bare network under DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module) and module.__class__.__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (a list of one element when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
