"""The Mamba1 scan on CPU with a compiled backward pass (cpu_scan_grad.c), as an autograd function: what
calibration by back-propagation runs on a CPU, where a C compiler is found (`kernels()` is None otherwise,
and PyTorch's autograd over the blocked scan of torch_ops runs instead).

PyTorch's autograd over the blocked scan keeps (b, l, d, n) intermediates for the backward pass, which at
d_state 48 is both the memory and most of the time of a calibration step. The forward kernel keeps only the
state entering each chunk of 64 tokens; the backward kernel recomputes each chunk's states from it.
Gradients flow to every input: Δ, x, A, B, C and the initial state. float32 is what calibration runs;
float64 is built from the same source for `torch.autograd.gradcheck`.

Mamba2 has no such kernel: its PyTorch scan (torch_ops.mamba2_scan, SSD) is already chunked. Per block of 64
tokens autograd keeps (T, T) decays and scores per head, the heads' B and C, and one state (h, p, n) entering
the block: no state per token, which is what this kernel removes from the Mamba1 backward, and its work is
matrix products that BLAS runs well on a CPU. (No Mamba2 calibration step on a CPU was measured.)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from runtime.ops import cpu_kernels

SOURCE = Path(__file__).with_name("cpu_scan_grad.c")
CHUNK = 64  # tokens per saved state: CHUNK in cpu_scan_grad.c
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_FORWARD = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_int]
_BACKWARD = [ctypes.c_void_p] * 13 + [ctypes.c_int64] * 4 + [ctypes.c_int]


@functools.cache
def kernels() -> SimpleNamespace | None:
    """The compiled forward and backward functions of both precisions, or None (no compiler, or it failed:
    logged once)."""
    signatures = {f"mamba1_scan_{kind}_{suffix}": argtypes for suffix in SUFFIX.values()
                  for kind, argtypes in (("save", _FORWARD), ("backward", _BACKWARD))}
    return cpu_kernels.load(SOURCE, signatures)


def _function(kind: str, dtype: torch.dtype) -> Any:
    library = kernels()
    assert library is not None, "cpu_scan_grad: no compiled kernels (check kernels() first)"
    return getattr(library, f"mamba1_scan_{kind}_{SUFFIX[dtype]}")


class Mamba1Scan(torch.autograd.Function):
    """(delta, x, A, B, C, h0) -> (y, last state), as cpu_scan.mamba1_scan, differentiable in every input."""

    @staticmethod
    def forward(ctx: Any, delta: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, l, d = delta.shape
        n = A.shape[-1]
        delta, x, A, B, C = (t.contiguous() for t in (delta, x, A, B, C))
        h = h0.clone(memory_format=torch.contiguous_format)  # (b, d, n): the initial state in, the last out
        y = torch.empty_like(delta)  # (b, l, d)
        saved = delta.new_empty(b, -(-l // CHUNK), d, n)  # (b, chunks, d, n): the state entering each chunk
        _function("save", delta.dtype)(*(t.data_ptr() for t in (delta, x, A, B, C, h, y, saved)), b, l, d, n,
                                       torch.get_num_threads())
        ctx.save_for_backward(delta, x, A, B, C, saved)
        return y, h

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        delta, x, A, B, C, saved = ctx.saved_tensors
        b, l, d = delta.shape
        n = A.shape[-1]
        dy = dy.contiguous()  # (b, l, d)
        dh = dh.clone(memory_format=torch.contiguous_format)  # (b, d, n): the last state's in, the first's out
        d_delta, d_x = torch.empty_like(delta), torch.empty_like(x)  # (b, l, d)
        dA = torch.empty_like(A)  # (b, d, n)
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)  # (b, l, n): sums over the channels
        _function("backward", delta.dtype)(*(t.data_ptr() for t in (delta, x, A, B, C, saved, dy, dh, d_delta, d_x,
                                                                    dA, dB, dC)), b, l, d, n, torch.get_num_threads())
        grads = (d_delta, d_x, dA, dB, dC, dh)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


def runs(delta: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether `mamba1_scan` runs these tensors: on CPU, float32 or float64 alike, with the kernels built."""
    return delta.device.type == "cpu" and delta.dtype == A.dtype and delta.dtype in SUFFIX and kernels() is not None


def mamba1_scan(delta: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable scan; `runs(delta, A)` must hold. delta, x: (b, l, d); A: (b, d, n); B, C: (b, l, n);
    h0: (b, d, n); all of one dtype. Returns y (b, l, d) without the D skip and gate, and the last state
    (b, d, n)."""
    y, h = Mamba1Scan.apply(delta, x, A, B, C, h0)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
    return y, h
