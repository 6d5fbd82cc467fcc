"""The Mamba1 prefill scan on CPU as a small C kernel (cpu_scan.c), compiled with the system's C compiler at
first use and cached; `None` from `kernel()` when there is no compiler, and the PyTorch scan runs instead.

Why: the PyTorch scan (torch_ops) is bound by memory traffic over its (tokens, d, n) intermediates, which grows
with the state size; the kernel keeps each channel's state in cache and reads every input once
(`bench/RESULTS.md` has the time to first token of a 60k-token prompt with both).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from runtime.ops import cpu_kernels

SOURCE = Path(__file__).with_name("cpu_scan.c")


@functools.cache
def kernel() -> Any:
    """The compiled scan function, or None (no compiler, or it failed: logged once)."""
    argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    library = cpu_kernels.load(SOURCE, {"mamba1_scan_f32": argtypes})
    return None if library is None else library.mamba1_scan_f32


def mamba1_scan(delta: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan through `kernel()`, which must not be None. delta, x: (b, l, d); A: (b, d, n); B, C: (b, l, n);
    h: (b, d, n) initial state. All float32 CPU tensors. Returns y (b, l, d) without the D skip and gate, and
    the last state (b, d, n)."""
    b, l, d = delta.shape
    n = A.shape[-1]
    delta, x, A, B, C = (t.contiguous() for t in (delta, x, A, B, C))
    h = h.clone(memory_format=torch.contiguous_format)
    y = torch.empty_like(delta)
    kernel()(*(t.data_ptr() for t in (delta, x, A, B, C, h, y)), b, l, d, n, torch.get_num_threads())
    return y, h
