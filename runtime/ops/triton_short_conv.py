"""The prefill's causal convolution of a short prompt chunk in one Triton kernel: taps, bias, SiLU, the scaled copy
and the new convolution state.

For a long chunk the convolution is a few large launches (cuDNN's grouped convolution, a SiLU pass); for the short
chunks of a burst of prompts every layer's convolution would be half a dozen small operations (the carried state
joined to the input, the convolution, the SiLU, the state's slice padded and copied), each costing the host more
than the device. Here a program holds a block of channels of one sequence and the whole chunk's positions
(at most SHORT_CHUNK), reads each tap's shifted input from the chunk or the carried state, and writes y, its scaled
copy where asked, and the state of the last k−1 inputs. Maths as the decode step's convolution (float32
multiply-adds, SiLU, one rounding to the model's dtype). Triton's interpreter (TRITON_INTERPRET=1) runs it on CPU
tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_classes import SHORT_CHUNK
from .triton_jit import jit
from .triton_short_scan import row_length

Tensor = torch.Tensor

BLOCK_CHANNELS = 16  # channels per program (each with SHORT_CHUNK positions)
CONV_WARPS = 4


@jit
def _tap(x_ptr: tl.tensor, state_ptr: tl.tensor, d: tl.tensor, at: tl.tensor, live: tl.tensor, stride_xt: tl.tensor,
         stride_xd: tl.tensor, stride_sd: tl.tensor, K: tl.constexpr, HAS_STATE: tl.constexpr) -> tl.tensor:
    """The inputs at positions `at` of channels d, float32: x's at at ≥ 0, the carried state's before (position −j
    is the state's k−1−j), zeros before without one. x_ptr and state_ptr point at the sequence's row."""
    v = tl.load(x_ptr + at * stride_xt + d * stride_xd, mask=live & (at >= 0), other=0.0).to(tl.float32)
    if HAS_STATE:
        v += tl.load(state_ptr + d * stride_sd + (K - 1 + at), mask=live & (at < 0), other=0.0).to(tl.float32)
    return v


@jit
def _short_conv_kernel(
        x_ptr: tl.tensor, state_ptr: tl.tensor, weight_ptr: tl.tensor, bias_ptr: tl.tensor, scale_ptr: tl.tensor,
        lengths_ptr: tl.tensor, y_ptr: tl.tensor, scaled_ptr: tl.tensor, new_state_ptr: tl.tensor,
        length: tl.tensor, channels: tl.tensor, stride_xb: tl.tensor, stride_xt: tl.tensor, stride_xd: tl.tensor,
        stride_sb: tl.tensor, stride_sd: tl.tensor,
        K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr) -> None:
    """Channels d (BLOCK_D,) of sequence b over the chunk's positions t (BLOCK_T,): y[b, t, d] = silu(bias +
    Σ_j w[d, j] · input[t − (K−1−j)]), y and its scaled copy (b, l, d) dense; new_state[b, d, :] the last K−1
    inputs, (b, d, K−1) dense: before the row's own length where lengths are given (rows padded on the right)."""
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    t = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    live_d = d < channels
    live = live_d[:, None] & (t < length)[None, :]  # (BLOCK_D, BLOCK_T)
    x_row, state_row = x_ptr + b * stride_xb, state_ptr + b * stride_sb
    acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(K):  # tap j reads the input K−1−j positions back
        w = tl.load(weight_ptr + d * K + j, mask=live_d, other=0.0).to(tl.float32)
        at = t[None, :] - (K - 1 - j)  # (1, BLOCK_T)
        acc += w[:, None] * _tap(x_row, state_row, d[:, None], at, live, stride_xt, stride_xd, stride_sd, K, HAS_STATE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=live_d, other=0.0).to(tl.float32)[:, None]
    y = (acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty)  # SiLU
    out_at = b * length * channels + t[None, :] * channels + d[:, None]
    tl.store(y_ptr + out_at, y, mask=live)
    if HAS_SCALE:  # the scale rounded to the activations' dtype first, as `x * s.to(x.dtype)` rounds it
        s = tl.load(scale_ptr + b * channels + d, mask=live_d, other=1.0).to(scaled_ptr.dtype.element_ty)
        scaled = y.to(tl.float32) * s.to(tl.float32)[:, None]
        tl.store(scaled_ptr + out_at, scaled.to(scaled_ptr.dtype.element_ty), mask=live)
    end = row_length(lengths_ptr, b, length, HAS_LENGTHS)  # its padding's positions are not the row's inputs
    i = tl.arange(0, BLOCK_K)  # the new state's K−1 inputs: positions end−(K−1)+i
    keep = live_d[:, None] & (i < K - 1)[None, :]
    at = end - (K - 1) + i[None, :]
    last = _tap(x_row, state_row, d[:, None], at, keep, stride_xt, stride_xd, stride_sd, K, HAS_STATE)
    tl.store(new_state_ptr + b * channels * (K - 1) + d[:, None] * (K - 1) + i[None, :],
             last.to(new_state_ptr.dtype.element_ty), mask=keep)


def short_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None, scale: Tensor | None,
                        lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """`contract.Ops.causal_conv1d` (and its scaled copy, with `scale` (b, c) float32) of a chunk of at most
    SHORT_CHUNK tokens: x (b, l, c) any strides; weight (c, k); bias (c,) or None; state (b, c, k-1) or None for
    zeros; lengths (b,) integer, each row's real tokens (rows padded on the right), or None: all l. Returns y and
    y · scale (or None), each (b, l, c) dense (token-major: the layout the short scans load a token's channels
    from at once, and out of which the projections multiply without a copy), and the new state (b, c, k-1) in x's
    dtype, each row's after its last real input."""
    b, l, c = x.shape
    k = weight.shape[-1]
    assert l <= SHORT_CHUNK and weight.is_contiguous() and k >= 2
    assert (state is None or state.stride(-1) == 1) and (lengths is None or lengths.is_contiguous())
    y = torch.empty(b, l, c, dtype=x.dtype, device=x.device)
    scaled = torch.empty_like(y) if scale is not None else None
    new_state = torch.empty(b, c, k - 1, dtype=x.dtype, device=x.device)
    unused = x  # a placeholder pointer where an optional input is absent (its constexpr flag is off)
    _short_conv_kernel[(triton.cdiv(c, BLOCK_CHANNELS), b)](
        x, state if state is not None else unused, weight, bias if bias is not None else unused,
        scale.contiguous() if scale is not None else unused, lengths if lengths is not None else unused, y,
        scaled if scaled is not None else y, new_state, l, c, *x.stride(),
        *(state.stride()[:2] if state is not None else (0, 0)),
        K=k, HAS_STATE=state is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_LENGTHS=lengths is not None, BLOCK_D=BLOCK_CHANNELS, BLOCK_T=triton.next_power_of_2(SHORT_CHUNK),
        BLOCK_K=triton.next_power_of_2(k - 1), num_warps=CONV_WARPS)
    return y, scaled, new_state
