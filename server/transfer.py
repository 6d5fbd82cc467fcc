"""Host values onto the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits for everything queued on the
stream: a decode step launched while the one before it still runs (the overlap, server.engine) would wait for
that step to finish, and the device would idle while the host queues the next. From pinned memory the copy is
queued behind the work before it, like a kernel (PyTorch's pinned-memory cache keeps the buffer until the copy
has run)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int] | Sequence[float], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor of `dtype` on `device`, queued on CUDA rather than waited for."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
