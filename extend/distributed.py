"""Data parallelism for calibration: the processes `torchrun` starts (or any launcher that sets torch.distributed's
usual environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) each take every WORLD_SIZE-th item of a step's
batch; sums are all-reduced, so every rank ends a step with the same loss and gradients, and rank 0 alone
writes. NCCL on CUDA, gloo on CPU. Without that environment there is one process and nothing is exchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def start(device_type: str) -> torch.device | None:
    """Joins the process group when launched by torchrun; returns this rank's CUDA device (None on CPU or alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type != "cuda":
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's part of `items`: every world-size-th one, from its rank on."""
    return items[rank()::world_size()]


def sum_across(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the ranks (in place; a float64 copy on the side keeps the sum's order from mattering
    to well below float32's precision)."""
    if world_size() > 1:
        total = value.detach().double()
        dist.all_reduce(total)
        value.copy_(total)
    return value


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (what rank 0 decided, so no rank can decide otherwise)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
