"""A Mamba1 decode step's small operations on CPU as C kernels (cpu_decode.c), built by cpu_kernels: the step
between the projections in one call, and the residual connection with the next RMSNorm in another. `None` from
`kernel()` when there is no compiler, and the PyTorch operators (torch_ops) run instead."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from runtime.ops import cpu_kernels
from runtime.ops.contract import Mamba1Weights

Tensor = torch.Tensor

SOURCE = Path(__file__).with_name("cpu_decode.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES: dict[str, Sequence[Any]] = {
    "mamba1_decode_f32": [_P, _I, _P, _I] + [_P] * 16 + [_I] * 5 + [ctypes.c_int],
    "add_rms_norm_f32": [_P] * 3 + [ctypes.c_float] + [_P] * 2 + [_I] * 2,
}
_negated_exp: WeakIdKeyDictionary = WeakIdKeyDictionary()  # A_log -> ((version, address), −exp(A_log))


@functools.cache
def kernel() -> SimpleNamespace | None:
    """The compiled functions, or None (no compiler, or it failed: logged once)."""
    return cpu_kernels.load(SOURCE, SIGNATURES)


def runs(states: tuple[Tensor, ...], inputs: tuple[Tensor | None, ...], rows: tuple[Tensor, ...] = (),
         int8: tuple[Tensor, ...] = ()) -> bool:
    """Whether the kernels take these tensors: the `states` they update in place and the `inputs` (None: absent)
    contiguous float32, the `rows` float32 with dense rows, the `int8` weights contiguous int8, all on the CPU,
    nothing recording autograd, and a built kernel. (Runs once per layer and token: the cheap tests first.)"""
    if kernel() is None:
        return False
    dense = [*states, *(t for t in inputs if t is not None)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in dense + list(rows)):
        return False
    for t in rows:
        if t.dtype != torch.float32 or not t.is_cpu or t.stride(-1) != 1:
            return False
    return (all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in dense)
            and all(t.dtype == torch.int8 and t.is_cpu and t.is_contiguous() for t in int8))


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernel() -> SimpleNamespace:
    functions = kernel()
    assert functions is not None, "the compiled kernels run only where `runs` holds"
    return functions


def mamba1_A(A_log: torch.Tensor) -> torch.Tensor:
    """−exp(A_log) (d, n) float32, computed once per layer, not per token: kept until A_log changes."""
    key = (0 if A_log.is_inference() else A_log._version, A_log.data_ptr())  # inference tensors have no version
    known: tuple[tuple[int, int], Tensor] | None = _negated_exp.get(A_log)  # type: ignore[no-untyped-call]
    if known is None or known[0] != key:
        known = key, -torch.exp(A_log.float())
        _negated_exp[A_log] = known
    return known[1]


def mamba1_decode(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba1_decode` through the kernel, where `runs` holds (x and z its `rows`: dense rows,
    views of in_proj's output). With row scales in `weights`, the kernel reads int8 projections. Returns y
    (b, d), gated, without the output projection."""
    w = weights
    b, d = x.shape
    n, k, r = h.shape[-1], w.conv_weight.shape[-1], w.dt_proj_weight.shape[-1]
    A = mamba1_A(w.A_log)
    slots = None if slots is None else slots.to(torch.int64).contiguous()
    buffer = torch.empty(b * (2 * d + r + 2 * n))  # y, then the kernel's scratch: convolved inputs, x_proj's output
    y = buffer[:b * d].view(b, d)
    _kernel().mamba1_decode_f32(
        x.data_ptr(), x.stride(0), z.data_ptr(), z.stride(0), conv_state.data_ptr(), w.conv_weight.data_ptr(),
        _pointer(w.conv_bias), w.x_proj_weight.data_ptr(), _pointer(w.x_proj_scale), w.dt_proj_weight.data_ptr(),
        _pointer(w.dt_proj_scale), w.dt_bias.data_ptr(), h.data_ptr(),
        A.data_ptr(), _pointer(a_scale), _pointer(delta_scale), w.D.data_ptr(), _pointer(slots),
        buffer.data_ptr() + b * d * 4, y.data_ptr(), b, d, n, r, k, torch.get_num_threads())
    return y


mamba1_decode_int8 = mamba1_decode  # `contract.Int8DecodeOps`: the row scales in the weights say int8


def add_rms_norm(residual: Tensor, update: Tensor | None, weight: Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`contract.Ops.add_rms_norm` through the kernel, where `runs` holds (all three its `inputs`) and `dtype`
    is float32. Returns both, (b, D) each."""
    assert dtype == torch.float32, "the kernel writes a float32 norm"
    b, m = residual.shape
    out, normed = torch.empty(2, b, m)
    _kernel().add_rms_norm_f32(residual.data_ptr(), _pointer(update), weight.data_ptr(), eps, out.data_ptr(),
                               normed.data_ptr(), b, m)
    return out, normed
