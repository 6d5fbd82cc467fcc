"""Triton kernels for the prefill's element-wise passes over (b, d, l) activations, one row per channel.

PyTorch runs an element-wise op on a strided or broadcast operand through its generic, unvectorised kernel:
the SiLU after the convolution reads a slice of the padded convolution output, and a per-channel Δ scale
broadcasts over positions, so each pass moved memory at a third of the bandwidth. Here each program streams
a contiguous block of one channel's positions. Results equal PyTorch's: float32 maths, one rounding to the
tensor's dtype per op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_jit import jit

from . import torch_ops

BLOCK_POSITIONS = 1024


@jit
def _channel_rows_kernel(in_ptr: tl.tensor, scale_ptr: tl.tensor, out_ptr: tl.tensor, scaled_ptr: tl.tensor,
                         length: tl.tensor, stride_in: tl.tensor, stride_out: tl.tensor, SILU: tl.constexpr,
                         HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr) -> None:
    """Row r (a batch row's channel): with SILU out[r, :length] = silu(in[r, :length]); with a scale
    scaled[r, :length] = that (or in itself) · scale[r]. Both outputs have row stride `stride_out`."""
    r = tl.program_id(0).to(tl.int64)  # rows on the grid's first axis: a batch's b·d exceeds the others' 65535
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) positions
    live = t < length
    v = tl.load(in_ptr + r * stride_in + t, mask=live, other=0.0).to(tl.float32)
    if SILU:
        v = (v / (1.0 + tl.exp(-v))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r * stride_out + t, v, mask=live)
        v = v.to(tl.float32)
    if HAS_SCALE:  # the scale rounded to the activations' dtype first, as `x * s.to(x.dtype)` rounds it
        v *= tl.load(scale_ptr + r).to(scaled_ptr.dtype.element_ty).to(tl.float32)
        tl.store(scaled_ptr + r * stride_out + t, v.to(scaled_ptr.dtype.element_ty), mask=live)


def _dense_rows(x: torch.Tensor) -> bool:
    """x (b, d, l)'s rows are each contiguous and follow one another (a row's stride apart, batch rows too)."""
    return x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1)


def _rows(x: torch.Tensor, length: int, scale: torch.Tensor | None,
          silu: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """x: (b, d, ≥ length) with rows of stride x.stride(1) one after another. Returns (silu(x) or None,
    x or silu(x) times scale or None), each (b, d, length) contiguous."""
    b, d = x.shape[:2]
    assert _dense_rows(x)
    out = torch.empty(b, d, length, dtype=x.dtype, device=x.device) if silu else None
    scaled = torch.empty(b, d, length, dtype=x.dtype, device=x.device) if scale is not None else None
    _channel_rows_kernel[(b * d, triton.cdiv(length, BLOCK_POSITIONS))](
        x, x if scale is None else scale, x if out is None else out, x if scaled is None else scaled, length,
        x.stride(1), length, SILU=silu, HAS_SCALE=scale is not None, BLOCK=BLOCK_POSITIONS)
    return out, scaled


def silu(x: torch.Tensor, length: int,
         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(x[..., :length]) for x (b, d, L ≥ length) with contiguous rows (a convolution's padded output), as
    a new (b, d, length) tensor; with `scale` (b, d) float32 also that times the scale, rounded as
    `torch_ops.scale_channels` rounds it, from the same pass (else None): the scan's input where one sequence's Δ
    scale is folded into it, at no extra launch (a prefill of a few thousand tokens is launch-bound)."""
    if torch_ops.records_autograd(x, scale):
        y = F.silu(x[..., :length])
        return y, None if scale is None else torch_ops.scale_channels(y.transpose(1, 2), scale).transpose(1, 2)
    if not _dense_rows(x):  # a convolution of a one-position input laid out channels-last answers in that
        x = x.contiguous()   # layout (Mamba2's first chunk of one token: its xBC is a slice of in_proj's output)
    out, scaled = _rows(x, length, None if scale is None else scale.contiguous(), True)
    assert out is not None
    return out, scaled


def scale_channels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`contract.Ops.scale_channels`: x (b, l, d), scale (b, d) float32. Returns x · scale in x's
    dtype and layout; the kernel runs where x is the (b, l, d) view of (b, d, l) storage that the
    convolution hands on, PyTorch otherwise."""
    channels_first = x.transpose(1, 2)  # (b, d, l)
    if not _dense_rows(channels_first) or torch_ops.records_autograd(x, scale):
        return torch_ops.scale_channels(x, scale)
    scaled = _rows(channels_first, x.shape[1], scale.contiguous(), False)[1]
    assert scaled is not None
    return scaled.transpose(1, 2)
