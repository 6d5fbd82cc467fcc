"""Host values onto the device without waiting for it.

A copy from pageable memory to a CUDA device waits for everything queued on the stream before it: the host would
wait for the device (a decode step launched while the one before it still runs, a training step's next batch)
and the device would then idle while the host queues the rest. From pinned memory the copy is queued behind the
work before it, like a kernel (PyTorch's pinned-memory cache keeps the buffer until the copy has run)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor | Sequence[int] | Sequence[float] | Sequence[Sequence[int]], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`host` (a tensor, or values, rows of values too, made a tensor of `dtype`) on `device`; on CUDA queued rather
    than waited for."""
    queued = device.type == "cuda"
    if not isinstance(host, torch.Tensor):
        host = torch.tensor(host, dtype=dtype, pin_memory=queued)
    elif queued:
        host = host.pin_memory()
    return host.to(device, non_blocking=queued)
