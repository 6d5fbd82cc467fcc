"""Fused Triton kernels for a Mamba1 decode step's state updates, behind the operator contract (`contract.Ops`).

In a captured decode graph what is left of a step's time is the GPU time of its small kernels, one per
element-wise op, so every piece of a step that PyTorch runs as several kernels is one kernel here:
  - `causal_conv1d_step`: the depthwise convolution over the last k inputs, bias, SiLU and the state shift
    (six PyTorch ops);
  - `mamba1_step`: A = −exp(A_log) (times a per-sequence A-spectrum scale), Δ = softplus(dt + dt_bias)
    (times a per-sequence Δ scale), exp(Δ·A), the state update, the read-out, the D skip and the z gate,
    which mamba_ssm's kernel cannot take per sequence (it has one A for the batch and computes Δ itself);
  - `mamba1_decode`: a whole Mamba1 step between the input and output projections in two kernels, x_proj
    of the convolved input (partial sums over channel blocks), then per channel block the convolution step,
    dt_proj and the state update.
The kernels take `slots`: sequence i's state is row slots[i] of a pool, read and written there, so a decode
step needs no gather of the batch's rows before and no scatter after.
The maths is that of `torch_ops` (Δ with softplus's threshold of 20, float32 throughout); tests compare them.
Triton's interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import jit

from . import torch_ops
from .contract import Mamba1Weights
from .triton_gemv import GEMV_MAX_ROWS

Tensor = torch.Tensor

SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default: above it, softplus(v) = v
# Launch shapes, chosen by `python -m bench.gpu_kernels` (batch 1, the 130m and 1.4b shapes)
BLOCK_CHANNELS = 16  # channels per program of the state-update kernels
DECODE_WARPS = 4
# The convolution step's past GEMV_MAX_ROWS sequences (Mamba2's decode), chosen by `python -m bench.gpu_kernels
# --ops conv_step --batch 64`: there a batch's programs cover the GPU many times over
CONV_BATCH_CHANNELS = 128
CONV_BATCH_WARPS = 4
X_PROJ_ROWS = 8  # x_proj rows per program (80 rows at 130m, 160 at 1.4b)
X_PROJ_CHANNELS = 1024  # channels per x_proj program: each state-update program adds d / 1024 partial sums
X_PROJ_WARPS = 4


@jit
def _state_row(slots_ptr: tl.tensor, b: tl.tensor, HAS_SLOTS: tl.constexpr) -> tl.tensor:
    """The state row of batch row b: slots[b] in a pool, else b itself."""
    if HAS_SLOTS:
        row = tl.load(slots_ptr + b).to(tl.int64)
    else:
        row = b.to(tl.int64)
    return row


@jit
def _conv_block(x_ptr: tl.tensor, state_row_ptr: tl.tensor, weight_ptr: tl.tensor, bias_ptr: tl.tensor, c: tl.tensor,
                live: tl.tensor, stride_sc: tl.tensor, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                SHIFT: tl.constexpr) -> tl.tensor:
    """silu(conv + bias) of channels c (BLOCK,) for one sequence, float32 rounded to the state's dtype, as
    PyTorch's step returns it. x_ptr and state_row_ptr point at the sequence's row; with SHIFT the state
    takes the new input (a kernel that only reads the convolution leaves the state to the one that owns it)."""
    x = tl.load(x_ptr + c, mask=live, other=0.0).to(tl.float32)
    j = tl.arange(0, BLOCK_K)  # (BLOCK_K,) taps; state[:, j] is the input K - 1 - j steps back
    taps = live[:, None] & (j[None, :] < K - 1)  # (BLOCK, BLOCK_K)
    at = state_row_ptr + c[:, None] * stride_sc + j[None, :]
    past = tl.load(at, mask=taps, other=0.0)  # (BLOCK, BLOCK_K)
    w = tl.load(weight_ptr + c[:, None] * K + j[None, :], mask=taps, other=0.0).to(tl.float32)
    acc = x * tl.load(weight_ptr + c * K + (K - 1), mask=live, other=0.0).to(tl.float32)
    acc += tl.sum(past.to(tl.float32) * w, axis=1)
    if SHIFT:
        # Threads hold copies of a tensor smaller than the block of threads, and one thread's tap is another's
        # next: every load must land before any thread overwrites the state.
        tl.debug_barrier()
        tl.store(at - 1, past, mask=taps & (j[None, :] >= 1))  # shift left by one
        tl.store(state_row_ptr + c * stride_sc + (K - 2), x.to(state_row_ptr.dtype.element_ty), mask=live)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=live, other=0.0).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))  # SiLU
    return out.to(state_row_ptr.dtype.element_ty).to(tl.float32)


@jit
def _conv_step_kernel(x_ptr: tl.tensor, state_ptr: tl.tensor, slots_ptr: tl.tensor, weight_ptr: tl.tensor,
                      bias_ptr: tl.tensor, out_ptr: tl.tensor, channels: tl.tensor, stride_xb: tl.tensor,
                      stride_sb: tl.tensor, stride_sc: tl.tensor, stride_ob: tl.tensor, K: tl.constexpr,
                      BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr,
                      BLOCK: tl.constexpr) -> None:
    b = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    live = c < channels
    state_row = state_ptr + _state_row(slots_ptr, b, HAS_SLOTS) * stride_sb
    out = _conv_block(x_ptr + b * stride_xb, state_row, weight_ptr, bias_ptr, c, live, stride_sc, K, BLOCK_K, HAS_BIAS,
                      True)
    tl.store(out_ptr + b * stride_ob + c, out.to(out_ptr.dtype.element_ty), mask=live)


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None,
                       slots: Tensor | None = None) -> Tensor:
    """One token of the causal convolution. x: (b, c); state: (b, c, k-1), or a pool (P, c, k-1) whose row
    slots[i] is sequence i's with `slots` (b,) int64; updated in place; weight (c, k).
    Returns silu(conv + bias) (b, c) in the state's dtype."""
    b, channels = x.shape
    k = weight.shape[-1]
    assert state.stride(2) == 1 and weight.is_contiguous() and x.stride(1) == 1
    out = torch.empty(b, channels, dtype=state.dtype, device=x.device)
    block, warps = (BLOCK_CHANNELS, 4) if b <= GEMV_MAX_ROWS else (CONV_BATCH_CHANNELS, CONV_BATCH_WARPS)
    _conv_step_kernel[(triton.cdiv(channels, block), b)](
        x, state, slots if slots is not None else x, weight, bias if bias is not None else weight, out, channels,
        x.stride(0), state.stride(0), state.stride(1), out.stride(0), K=k, BLOCK_K=triton.next_power_of_2(k),
        HAS_BIAS=bias is not None, HAS_SLOTS=slots is not None, BLOCK=block, num_warps=warps)
    return out


@jit
def softplus(v: tl.tensor, THRESHOLD: tl.constexpr) -> tl.tensor:
    """PyTorch's softplus of v (float32): v itself above THRESHOLD, else log(1 + exp(v))."""
    u = tl.exp(tl.minimum(v, THRESHOLD))
    w = 1.0 + u  # log1p(u) = log(w)·u/(w − 1) keeps full precision when u is tiny (Goldberg's trick)
    tiny = w == 1.0
    return tl.where(v > THRESHOLD, v, tl.where(tiny, u, tl.log(w) * u / tl.where(tiny, 1.0, w - 1.0)))


@jit
def _ssm_update(h_row_ptr: tl.tensor, stride_hd: tl.tensor, v: tl.tensor, x: tl.tensor, B: tl.tensor, C: tl.tensor,
                d: tl.tensor, n: tl.tensor, live: tl.tensor, live2: tl.tensor, scale_row_ptr: tl.tensor,
                A_log_ptr: tl.tensor, stride_Ad: tl.tensor, a_row_ptr: tl.tensor, stride_ad: tl.tensor,
                D_ptr: tl.tensor, z_row_ptr: tl.tensor, HAS_SCALE: tl.constexpr, HAS_A_SCALE: tl.constexpr,
                HAS_Z: tl.constexpr, THRESHOLD: tl.constexpr) -> tl.tensor:
    """One sequence's state update for channels d (BLOCK,) and states n (BLOCK_N,), in place in h's row, from
    v = dt + dt_bias, x, B and C (float32). Returns y (BLOCK,) float32 with the D skip and the z gate."""
    delta = softplus(v, THRESHOLD)
    if HAS_SCALE:
        delta *= tl.load(scale_row_ptr + d, mask=live, other=1.0)
    A_log = tl.load(A_log_ptr + d[:, None] * stride_Ad + n[None, :], mask=live2, other=0.0).to(tl.float32)
    A = -tl.exp(A_log)  # (BLOCK, BLOCK_N)
    if HAS_A_SCALE:
        A *= tl.load(a_row_ptr + d[:, None] * stride_ad + n[None, :], mask=live2, other=1.0)
    h_at = h_row_ptr + d[:, None] * stride_hd + n[None, :]
    h = tl.load(h_at, mask=live2, other=0.0)
    tl.debug_barrier()  # as in `_conv_block`: copies of a small tile must all load h before one stores it
    h = h * tl.exp(delta[:, None] * A) + (delta * x)[:, None] * B[None, :]
    tl.store(h_at, h, mask=live2)
    y = tl.sum(h * C[None, :], axis=1) + x * tl.load(D_ptr + d, mask=live, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_row_ptr + d, mask=live, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))  # SiLU gate
    return y


@jit
def _mamba1_step_kernel(
        # tensors
        h_ptr: tl.tensor, slots_ptr: tl.tensor, x_ptr: tl.tensor, dt_ptr: tl.tensor, dt_bias_ptr: tl.tensor,
        scale_ptr: tl.tensor, A_log_ptr: tl.tensor, a_ptr: tl.tensor, B_ptr: tl.tensor, C_ptr: tl.tensor,
        D_ptr: tl.tensor, z_ptr: tl.tensor, y_ptr: tl.tensor,
        # sizes and strides
        channels: tl.tensor, n_state: tl.tensor, stride_hb: tl.tensor, stride_hd: tl.tensor, stride_xb: tl.tensor,
        stride_dtb: tl.tensor, stride_sb: tl.tensor, stride_Ad: tl.tensor, stride_ab: tl.tensor, stride_ad: tl.tensor,
        stride_Bb: tl.tensor, stride_Cb: tl.tensor, stride_zb: tl.tensor, stride_yb: tl.tensor,
        HAS_SLOTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_A_SCALE: tl.constexpr, HAS_Z: tl.constexpr,
        THRESHOLD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr) -> None:
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    live = d < channels
    live2 = live[:, None] & (n[None, :] < n_state)  # (BLOCK, BLOCK_N)
    v = tl.load(dt_ptr + b * stride_dtb + d, mask=live, other=0.0).to(tl.float32)
    v += tl.load(dt_bias_ptr + d, mask=live, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * stride_xb + d, mask=live, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + b * stride_Bb + n, mask=n < n_state, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * stride_Cb + n, mask=n < n_state, other=0.0).to(tl.float32)
    h_row = h_ptr + _state_row(slots_ptr, b, HAS_SLOTS) * stride_hb
    y = _ssm_update(h_row, stride_hd, v, x, B, C, d, n, live, live2, scale_ptr + b * stride_sb, A_log_ptr, stride_Ad,
                    a_ptr + b * stride_ab, stride_ad, D_ptr, z_ptr + b * stride_zb,
                    HAS_SCALE, HAS_A_SCALE, HAS_Z, THRESHOLD)
    tl.store(y_ptr + b * stride_yb + d, y.to(y_ptr.dtype.element_ty), mask=live)


def mamba1_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None, *,
                dt_bias: Tensor, A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba1_step` in one kernel: h (b, d, n) float32, or a pool (P, d, n) whose row slots[i] is
    sequence i's, updated in place; x, dt, z (b, d); B, C (b, n). Returns y (b, d) in x's dtype."""
    b, d = x.shape
    n = h.shape[-1]
    assert all(t is None or t.stride(-1) == 1 for t in (h, x, dt, delta_scale, A_log, a_scale, B, C, z))
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(d, BLOCK_CHANNELS), b)
    unused = h  # a placeholder pointer where an optional input is absent (its constexpr flag is off)
    _mamba1_step_kernel[grid](
        h, slots if slots is not None else unused, x, dt, dt_bias, delta_scale if delta_scale is not None else unused,
        A_log, a_scale if a_scale is not None else unused, B, C, D, z if z is not None else unused, y, d, n,
        h.stride(0), h.stride(1), x.stride(0), dt.stride(0), delta_scale.stride(0) if delta_scale is not None else 0,
        A_log.stride(0), a_scale.stride(0) if a_scale is not None else 0,
        a_scale.stride(1) if a_scale is not None else 0,
        B.stride(0), C.stride(0), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_SLOTS=slots is not None, HAS_SCALE=delta_scale is not None, HAS_A_SCALE=a_scale is not None,
        HAS_Z=z is not None, THRESHOLD=SOFTPLUS_THRESHOLD, BLOCK=BLOCK_CHANNELS, BLOCK_N=triton.next_power_of_2(n))
    return y


@jit
def _conv_x_proj_kernel(x_ptr: tl.tensor, state_ptr: tl.tensor, slots_ptr: tl.tensor, weight_ptr: tl.tensor,
                        bias_ptr: tl.tensor, proj_ptr: tl.tensor, partial_ptr: tl.tensor, channels: tl.tensor,
                        rows: tl.tensor, stride_xb: tl.tensor, stride_sb: tl.tensor, stride_sc: tl.tensor,
                        stride_pr: tl.tensor, stride_qb: tl.tensor, stride_qs: tl.tensor, K: tl.constexpr,
                        BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr) -> None:
    """x_proj(conv(x)) over one block of channels for some rows and one sequence: a partial sum (float32) that
    the state-update kernel adds up with the other channel blocks'. Split over channels as well as rows so
    that the few rows (r + 2n) still make enough programs; each convolves its channels itself (k
    multiply-adds per channel) rather than wait for a separate convolution kernel; none writes the state."""
    b = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,) output rows
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    live_r, live = r < rows, c < channels
    state_row = state_ptr + _state_row(slots_ptr, b, HAS_SLOTS) * stride_sb
    conv = _conv_block(x_ptr + b * stride_xb, state_row, weight_ptr, bias_ptr, c, live, stride_sc,
                       K, BLOCK_K, HAS_BIAS, False)  # (BLOCK,)
    w = tl.load(proj_ptr + r[:, None] * stride_pr + c[None, :], mask=live_r[:, None] & live[None, :], other=0.0)
    partial = tl.sum(w.to(tl.float32) * conv[None, :], axis=1)  # (BLOCK_ROWS,)
    tl.store(partial_ptr + b * stride_qb + tl.program_id(1) * stride_qs + r, partial, mask=live_r)


@jit
def _x_proj_rows(partial_row_ptr: tl.tensor, stride_qs: tl.tensor, splits: tl.tensor, first: tl.tensor,
                 count: tl.tensor, BLOCK_SPLITS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 DTYPE: tl.constexpr) -> tl.tensor:
    """Rows [first, first + count) of x_proj's output for one sequence (BLOCK_ROWS,) float32: the channel
    blocks' partial sums added up and rounded to the model's dtype, as F.linear's output is."""
    s = tl.arange(0, BLOCK_SPLITS)
    i = tl.arange(0, BLOCK_ROWS)
    parts = tl.load(partial_row_ptr + s[:, None] * stride_qs + first + i[None, :],
                    mask=(s[:, None] < splits) & (i[None, :] < count), other=0.0)  # (BLOCK_SPLITS, BLOCK_ROWS)
    return tl.sum(parts, axis=0).to(DTYPE).to(tl.float32)


@jit
def _mamba1_decode_kernel(
        # tensors
        x_ptr: tl.tensor, conv_ptr: tl.tensor, slots_ptr: tl.tensor, conv_weight_ptr: tl.tensor,
        conv_bias_ptr: tl.tensor, partial_ptr: tl.tensor, dt_proj_ptr: tl.tensor, h_ptr: tl.tensor,
        dt_bias_ptr: tl.tensor, scale_ptr: tl.tensor, A_log_ptr: tl.tensor, a_ptr: tl.tensor, D_ptr: tl.tensor,
        z_ptr: tl.tensor, y_ptr: tl.tensor,
        # sizes and strides
        channels: tl.tensor, n_state: tl.tensor, rank: tl.tensor, splits: tl.tensor, stride_xb: tl.tensor,
        stride_cb: tl.tensor, stride_cc: tl.tensor, stride_qb: tl.tensor, stride_qs: tl.tensor, stride_wd: tl.tensor,
        stride_hb: tl.tensor, stride_hd: tl.tensor, stride_sb: tl.tensor, stride_Ad: tl.tensor, stride_ab: tl.tensor,
        stride_ad: tl.tensor, stride_zb: tl.tensor, stride_yb: tl.tensor,
        K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_A_SCALE: tl.constexpr, HAS_Z: tl.constexpr, THRESHOLD: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_SPLITS: tl.constexpr) -> None:
    """The convolution step (this program's channels, state shifted), dt_proj, and the state update."""
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    j = tl.arange(0, BLOCK_RANK)  # (BLOCK_RANK,) Δ's low-rank inputs
    live = d < channels
    live2 = live[:, None] & (n[None, :] < n_state)  # (BLOCK, BLOCK_N)
    row = _state_row(slots_ptr, b, HAS_SLOTS)
    x = _conv_block(x_ptr + b * stride_xb, conv_ptr + row * stride_cb, conv_weight_ptr, conv_bias_ptr, d, live,
                    stride_cc, K, BLOCK_K, HAS_CONV_BIAS, True)  # (BLOCK,)
    partial_row = partial_ptr + b * stride_qb  # x_proj's output [dt_low (rank) | B (n) | C (n)], in parts
    dtype = dt_proj_ptr.dtype.element_ty  # the model's, x_proj's too
    low = _x_proj_rows(partial_row, stride_qs, splits, 0, rank, BLOCK_SPLITS, BLOCK_RANK, dtype)
    B = _x_proj_rows(partial_row, stride_qs, splits, rank, n_state, BLOCK_SPLITS, BLOCK_N, dtype)
    C = _x_proj_rows(partial_row, stride_qs, splits, rank + n_state, n_state, BLOCK_SPLITS, BLOCK_N, dtype)
    w = tl.load(dt_proj_ptr + d[:, None] * stride_wd + j[None, :], mask=live[:, None] & (j[None, :] < rank), other=0.0)
    dt = tl.sum(w.to(tl.float32) * low[None, :], axis=1).to(dtype)  # rounded as F.linear's
    v = dt.to(tl.float32) + tl.load(dt_bias_ptr + d, mask=live, other=0.0).to(tl.float32)
    y = _ssm_update(h_ptr + row * stride_hb, stride_hd, v, x, B, C, d, n, live, live2, scale_ptr + b * stride_sb,
                    A_log_ptr, stride_Ad, a_ptr + b * stride_ab, stride_ad, D_ptr, z_ptr + b * stride_zb,
                    HAS_SCALE, HAS_A_SCALE, HAS_Z, THRESHOLD)
    tl.store(y_ptr + b * stride_yb + d, y.to(y_ptr.dtype.element_ty), mask=live)


def mamba1_decode(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba1_decode` in two kernels: x_proj of the convolved input in partial sums over channel
    blocks, then per channel block the convolution step, dt_proj and the state update (the projections and
    the convolution would otherwise be kernels that only wait on each other). Past GEMV_MAX_ROWS sequences,
    the composed step: the fused kernels read x_proj and dt_proj once per sequence, a matrix product once for
    the batch."""
    if x.shape[0] > GEMV_MAX_ROWS:
        return torch_ops.composed_mamba1_decode(causal_conv1d_step, mamba1_step, x, z, conv_state, h, weights,
                                                delta_scale=delta_scale, a_scale=a_scale, slots=slots)
    conv_weight, conv_bias, x_proj_weight, dt_proj_weight = (weights.conv_weight, weights.conv_bias,
                                                             weights.x_proj_weight, weights.dt_proj_weight)
    dt_bias, A_log, D = weights.dt_bias, weights.A_log, weights.D
    b, d = x.shape
    k, n, rank = conv_weight.shape[-1], h.shape[-1], dt_proj_weight.shape[1]
    rows = x_proj_weight.shape[0]
    assert rows == rank + 2 * n, f"x_proj has {rows} rows for Δ rank {rank} and {n} states"
    assert x_proj_weight.dtype == dt_proj_weight.dtype
    assert all(t is None or t.stride(-1) == 1 for t in (x, z, conv_state, h, A_log, a_scale, delta_scale))
    assert conv_weight.is_contiguous() and x_proj_weight.stride(1) == 1 and dt_proj_weight.stride(1) == 1
    unused = h  # a placeholder pointer where an optional input is absent (its constexpr flag is off)
    slots_arg = slots if slots is not None else unused
    conv_bias_arg = conv_bias if conv_bias is not None else conv_weight
    splits = triton.cdiv(d, X_PROJ_CHANNELS)
    partial = torch.empty(b, splits, rows, dtype=torch.float32, device=x.device)  # (b, splits, rank + 2n)
    _conv_x_proj_kernel[(triton.cdiv(rows, X_PROJ_ROWS), splits, b)](
        x, conv_state, slots_arg, conv_weight, conv_bias_arg, x_proj_weight, partial, d, rows,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), x_proj_weight.stride(0), partial.stride(0),
        partial.stride(1), K=k, BLOCK_K=triton.next_power_of_2(k), HAS_BIAS=conv_bias is not None,
        HAS_SLOTS=slots is not None, BLOCK_ROWS=X_PROJ_ROWS, BLOCK=X_PROJ_CHANNELS, num_warps=X_PROJ_WARPS)
    y = torch.empty(b, d, dtype=conv_state.dtype, device=x.device)
    _mamba1_decode_kernel[(triton.cdiv(d, BLOCK_CHANNELS), b)](
        x, conv_state, slots_arg, conv_weight, conv_bias_arg, partial, dt_proj_weight, h, dt_bias,
        delta_scale if delta_scale is not None else unused, A_log, a_scale if a_scale is not None else unused, D,
        z if z is not None else unused, y, d, n, rank, splits,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), partial.stride(0), partial.stride(1),
        dt_proj_weight.stride(0), h.stride(0), h.stride(1), delta_scale.stride(0) if delta_scale is not None else 0,
        A_log.stride(0), a_scale.stride(0) if a_scale is not None else 0,
        a_scale.stride(1) if a_scale is not None else 0, z.stride(0) if z is not None else 0, y.stride(0),
        K=k, BLOCK_K=triton.next_power_of_2(k), HAS_CONV_BIAS=conv_bias is not None, HAS_SLOTS=slots is not None,
        HAS_SCALE=delta_scale is not None, HAS_A_SCALE=a_scale is not None, HAS_Z=z is not None,
        THRESHOLD=SOFTPLUS_THRESHOLD, BLOCK=BLOCK_CHANNELS, BLOCK_N=triton.next_power_of_2(n),
        BLOCK_RANK=triton.next_power_of_2(rank), BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
        num_warps=DECODE_WARPS)
    return y
