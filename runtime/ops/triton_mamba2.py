"""Triton kernels of a Mamba2 decode step and of its output norm, behind the operator contract (`contract.Ops`):
  - `mamba2_step`: Δ = softplus(dt + dt_bias) clamped to dt_limit (times a per-sequence Δ scale per head),
    A = −exp(A_log) (times a per-sequence A scale per head), the state update of some of a head's channels,
    the read-out and the D skip, one kernel where PyTorch runs a dozen (mamba_ssm's state update takes one A
    for the batch, and Δ computed before it);
  - `gated_rms_norm`: y · SiLU(z), its RMSNorm over each group and the weight, one pass over rows: a decode
    step's b rows, and a prefill's b·l rows, where PyTorch writes several (l, d) float32 intermediates;
  - `mamba2_decode`: the convolution step (`triton_ssm.causal_conv1d_step`), `mamba2_step` and
    `gated_rms_norm`, three kernels between the projections whatever the batch (they read no projection
    weights, so a larger batch gains nothing from a matrix product).
States are read and written in a pool's rows at `slots`, as in `triton_ssm`. The maths is `torch_ops`'s
(float32, softplus's threshold of 20); tests compare them. Triton's interpreter (TRITON_INTERPRET=1) runs
these kernels on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops
from .contract import Mamba2Weights
from .triton_jit import jit
from .triton_ssm import SOFTPLUS_THRESHOLD, _state_row, causal_conv1d_step, softplus

Tensor = torch.Tensor

# Channels of a head per program: at head dim 64 a (16, 128) float32 state tile, and four programs per head,
# so that batch 1's few dozen heads still spread over the GPU (as mamba_ssm's state update splits them).
BLOCK_HEAD_CHANNELS = 16
STEP_WARPS = 4


@jit
def _mamba2_step_kernel(
        # tensors
        h_ptr: tl.tensor, slots_ptr: tl.tensor, x_ptr: tl.tensor, dt_ptr: tl.tensor, dt_bias_ptr: tl.tensor,
        scale_ptr: tl.tensor, A_log_ptr: tl.tensor, a_ptr: tl.tensor, B_ptr: tl.tensor, C_ptr: tl.tensor,
        D_ptr: tl.tensor, y_ptr: tl.tensor,
        # sizes, Δ's limits and strides
        head_dim: tl.tensor, n_state: tl.tensor, heads_per_group: tl.tensor, dt_min: tl.tensor, dt_max: tl.tensor,
        stride_hb: tl.tensor, stride_hh: tl.tensor, stride_hp: tl.tensor, stride_xb: tl.tensor, stride_xh: tl.tensor,
        stride_dtb: tl.tensor, stride_sb: tl.tensor, stride_ab: tl.tensor, stride_Bb: tl.tensor, stride_Bg: tl.tensor,
        stride_Cb: tl.tensor, stride_Cg: tl.tensor, stride_yb: tl.tensor, stride_yh: tl.tensor,
        HAS_SLOTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_A_SCALE: tl.constexpr, THRESHOLD: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr) -> None:
    """Channels i (BLOCK,) of head `head` of sequence b: h ← exp(Δ·A) h + Δ x ⊗ B, y = h C + D x."""
    b = tl.program_id(2)
    head = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) the head's channels
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    live, live_n = i < head_dim, n < n_state
    live2 = live[:, None] & live_n[None, :]  # (BLOCK, BLOCK_N)
    v = tl.load(dt_ptr + b * stride_dtb + head).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32)
    delta = tl.minimum(tl.maximum(softplus(v, THRESHOLD), dt_min), dt_max)  # clamped before any scale
    if HAS_SCALE:
        delta *= tl.load(scale_ptr + b * stride_sb + head)
    A = -tl.exp(tl.load(A_log_ptr + head).to(tl.float32))
    if HAS_A_SCALE:
        A *= tl.load(a_ptr + b * stride_ab + head)
    group = head // heads_per_group
    x = tl.load(x_ptr + b * stride_xb + head * stride_xh + i, mask=live, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + b * stride_Bb + group * stride_Bg + n, mask=live_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * stride_Cb + group * stride_Cg + n, mask=live_n, other=0.0).to(tl.float32)
    h_at = h_ptr + _state_row(slots_ptr, b, HAS_SLOTS) * stride_hb + head * stride_hh \
        + i[:, None] * stride_hp + n[None, :]
    h = tl.load(h_at, mask=live2, other=0.0)
    tl.debug_barrier()  # copies of a small tile must all load h before one stores it (see triton_ssm)
    h = h * tl.exp(delta * A) + (delta * x)[:, None] * B[None, :]
    tl.store(h_at, h, mask=live2)
    y = tl.sum(h * C[None, :], axis=1) + x * tl.load(D_ptr + head).to(tl.float32)
    tl.store(y_ptr + b * stride_yb + head * stride_yh + i, y, mask=live)


def mamba2_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, *, dt_bias: Tensor,
                dt_limit: tuple[float, float], A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba2_step` in one kernel: h (b, h, p, n) float32, or a pool (P, h, p, n) whose row slots[i]
    is sequence i's, updated in place; x (b, h, p); dt (b, h); B, C (b, g, n). Returns y (b, h, p) float32."""
    b, heads, p = x.shape
    n, groups = h.shape[-1], B.shape[1]
    assert all(t is None or t.stride(-1) == 1 for t in (h, x, dt, B, C, delta_scale, a_scale))
    assert dt_bias.is_contiguous() and A_log.is_contiguous() and D.is_contiguous()
    y = torch.empty(b, heads, p, dtype=torch.float32, device=x.device)
    unused = h  # a placeholder pointer where an optional input is absent (its constexpr flag is off)
    _mamba2_step_kernel[(triton.cdiv(p, BLOCK_HEAD_CHANNELS), heads, b)](
        h, slots if slots is not None else unused, x, dt, dt_bias, delta_scale if delta_scale is not None else unused,
        A_log, a_scale if a_scale is not None else unused, B, C, D, y, p, n, heads // groups,
        float(dt_limit[0]), float(dt_limit[1]), h.stride(0), h.stride(1), h.stride(2), x.stride(0), x.stride(1),
        dt.stride(0), delta_scale.stride(0) if delta_scale is not None else 0,
        a_scale.stride(0) if a_scale is not None else 0, B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        y.stride(0), y.stride(1), HAS_SLOTS=slots is not None, HAS_SCALE=delta_scale is not None,
        HAS_A_SCALE=a_scale is not None, THRESHOLD=SOFTPLUS_THRESHOLD, BLOCK=BLOCK_HEAD_CHANNELS,
        BLOCK_N=triton.next_power_of_2(n), num_warps=STEP_WARPS)
    return y


@jit
def _gated_rms_norm_kernel(y_ptr: tl.tensor, z_ptr: tl.tensor, weight_ptr: tl.tensor, out_ptr: tl.tensor,
                           width: tl.tensor, eps: tl.tensor, stride_yr: tl.tensor, stride_zr: tl.tensor,
                           stride_or: tl.tensor, BLOCK: tl.constexpr) -> None:
    """Group g (`width` columns) of row r: v = y · SiLU(z), v / RMS(v) · weight, in float32."""
    r = tl.program_id(0).to(tl.int64)  # rows on the grid's first axis: a prefill's b·l exceeds the others' 65535
    c = tl.program_id(1) * width + tl.arange(0, BLOCK)  # (BLOCK,) the group's columns
    live = tl.arange(0, BLOCK) < width
    y = tl.load(y_ptr + r * stride_yr + c, mask=live, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r * stride_zr + c, mask=live, other=0.0).to(tl.float32)
    v = y * (z / (1.0 + tl.exp(-z)))
    inverse_rms = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / width + eps)
    out = v * inverse_rms * tl.load(weight_ptr + c, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * stride_or + c, out.to(out_ptr.dtype.element_ty), mask=live)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """`contract.Ops.gated_rms_norm` in one pass: y, z (..., d) with unit column stride; weight (d,). Returns
    (..., d) in z's dtype. PyTorch's operators where autograd records (the kernel has no backward)."""
    if torch_ops.records_autograd(y, z, weight):
        return torch_ops.gated_rms_norm(y, z, weight, groups, eps)
    d = y.shape[-1]
    rows_y, rows_z = y.reshape(-1, d), z.reshape(-1, d)  # (r, d): views of a prefill's (b, l, d) layouts
    assert rows_y.stride(-1) == 1 and rows_z.stride(-1) == 1 and weight.is_contiguous() and d % groups == 0
    out = torch.empty(rows_y.shape, dtype=z.dtype, device=z.device)  # (r, d)
    block = triton.next_power_of_2(d // groups)
    _gated_rms_norm_kernel[(rows_y.shape[0], groups)](
        rows_y, rows_z, weight, out, d // groups, eps, rows_y.stride(0), rows_z.stride(0), out.stride(0), BLOCK=block,
        num_warps=min(max(block // 256, 1), 8))
    return out.view(z.shape)


def mamba2_decode(xBC: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba2Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba2_decode` in three kernels: the convolution step, `mamba2_step`, `gated_rms_norm`."""
    return torch_ops.composed_mamba2_decode(causal_conv1d_step, mamba2_step, gated_rms_norm, xBC, z, dt, conv_state,
                                            h, weights, delta_scale=delta_scale, a_scale=a_scale, slots=slots)
