"""The scans of short prompt chunks in one Triton kernel each: a program walks its channels' tokens one by one.

mamba_ssm's scans are built for long sequences: Mamba1's has a warp per (sequence, channel) scan a chunk of up to
2,048 tokens in parallel, once per state; Mamba2's SSD runs five kernels over chunks of SSD_CHUNK tokens. A burst
of many short prompts (a server's prefill step of 64 prompts of 64 tokens) makes many tiny warps or mostly empty
chunks, and the scan then costs several times as much a token as one long prompt's. Here a program holds the
states of a block of channels of one sequence (Mamba1: (BLOCK_D, n); Mamba2: (BLOCK_P, n) of one head) float32 in
registers and steps through the chunk's tokens: the work a token is the decode step's, and no token waits for a
parallel scan's passes. They also take what mamba_ssm's kernels cannot, so a batch is one launch whatever it
carries: an initial state per sequence (a continued chunk), an A per sequence (an A-spectrum scale) and, for Mamba1,
a Δ scale per sequence (Mamba2's Δ comes discretised and scaled), and each row's own length where a step's rows are
padded on the right (`runtime.padding`): a row's walk stops at its end, its state the one after its last real token.
A step loads the next token's inputs before computing with this one's, so that it waits on arithmetic rather than on
memory, and each load is one token's channels (the CUDA back-end hands a short chunk's tensors on token-major).
Mamba1's writes y (b, l, d) dense, the layout out_proj multiplies without a copy.

Maths as `torch_ops` (Mamba1: Δ = softplus(dt + dt_bias) with softplus's threshold, times the scale; float32
throughout, y rounded once to x's dtype; Mamba2: y float32, as the contract allows). Triton's interpreter
(TRITON_INTERPRET=1) runs them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_classes
from .triton_jit import jit
from .triton_ssm import SOFTPLUS_THRESHOLD, softplus

Tensor = torch.Tensor

SCAN_WARPS = 4
BLOCK_HEAD_CHANNELS = 16  # Mamba2: a head's channels per program, a (16, n) state tile (n = 128 at published shapes)


@jit
def row_length(lengths_ptr: tl.tensor, b: tl.tensor, length: tl.tensor, HAS_LENGTHS: tl.constexpr) -> tl.tensor:
    """Row b's own length: its real tokens, the rest of the chunk's `length` being right padding."""
    if HAS_LENGTHS:
        return tl.load(lengths_ptr + b).to(tl.int32)
    return length


@jit
def _short_scan_kernel(
        # tensors
        x_ptr: tl.tensor, dt_ptr: tl.tensor, dt_bias_ptr: tl.tensor, scale_ptr: tl.tensor, A_ptr: tl.tensor,
        B_ptr: tl.tensor, C_ptr: tl.tensor, D_ptr: tl.tensor, z_ptr: tl.tensor, h0_ptr: tl.tensor,
        lengths_ptr: tl.tensor, y_ptr: tl.tensor, h_ptr: tl.tensor,
        # sizes and strides (batch, token and channel strides of the (b, l, d) tensors, batch and token ones of B, C)
        length: tl.tensor, channels: tl.tensor, states: tl.tensor, stride_xb: tl.tensor, stride_xt: tl.tensor,
        stride_xd: tl.tensor, stride_dtb: tl.tensor, stride_dtt: tl.tensor, stride_dtd: tl.tensor,
        stride_zb: tl.tensor, stride_zt: tl.tensor, stride_zd: tl.tensor, stride_Bb: tl.tensor, stride_Bt: tl.tensor,
        stride_Bn: tl.tensor, stride_Cb: tl.tensor, stride_Ct: tl.tensor, stride_Cn: tl.tensor, stride_sb: tl.tensor,
        stride_Ab: tl.tensor, stride_Ad: tl.tensor, stride_h0b: tl.tensor, stride_h0d: tl.tensor,
        HAS_SCALE: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr,
        THRESHOLD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr) -> None:
    """Channels d (BLOCK_D,) of sequence b, token by token: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,
    y_t = (C_t · h_t + D x_t) · SiLU(z_t); then the last state. y is (b, l, d) dense, h (b, d, n) dense. With
    lengths, row b stops at its own: its state is the one after its last real token, and y is 0 past it."""
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    live_d, live_n = d < channels, n < states
    dn = live_d[:, None] & live_n[None, :]  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + b * stride_Ab + d[:, None] * stride_Ad + n[None, :], mask=dn, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + d, mask=live_d, other=0.0).to(tl.float32)
    skip = tl.load(D_ptr + d, mask=live_d, other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + b * stride_sb + d, mask=live_d, other=1.0)
    if HAS_H0:
        h = tl.load(h0_ptr + b * stride_h0b + d[:, None] * stride_h0d + n[None, :], mask=dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    x_row, dt_row, z_row = x_ptr + b * stride_xb, dt_ptr + b * stride_dtb, z_ptr + b * stride_zb
    B_row, C_row = B_ptr + b * stride_Bb, C_ptr + b * stride_Cb
    y_row = y_ptr + b * length * channels
    real = row_length(lengths_ptr, b, length, HAS_LENGTHS)
    # Each step loads the next token's inputs before it computes with this one's (the last token's loads repeat,
    # unread): a step waits on the arithmetic, not on memory
    x_next = tl.load(x_row + d * stride_xd, mask=live_d, other=0.0)
    v_next = tl.load(dt_row + d * stride_dtd, mask=live_d, other=0.0)
    B_next = tl.load(B_row + n * stride_Bn, mask=live_n, other=0.0)
    C_next = tl.load(C_row + n * stride_Cn, mask=live_n, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_row + d * stride_zd, mask=live_d, other=0.0)
    for t in range(real):
        x, v, B, C = x_next.to(tl.float32), v_next.to(tl.float32), B_next.to(tl.float32), C_next.to(tl.float32)
        ahead = tl.minimum(t + 1, real - 1)
        x_next = tl.load(x_row + ahead * stride_xt + d * stride_xd, mask=live_d, other=0.0)
        v_next = tl.load(dt_row + ahead * stride_dtt + d * stride_dtd, mask=live_d, other=0.0)
        B_next = tl.load(B_row + ahead * stride_Bt + n * stride_Bn, mask=live_n, other=0.0)
        C_next = tl.load(C_row + ahead * stride_Ct + n * stride_Cn, mask=live_n, other=0.0)
        delta = softplus(v + bias, THRESHOLD)
        if HAS_SCALE:
            delta *= scale
        h = h * tl.exp(delta[:, None] * A) + (delta * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1) + skip * x
        if HAS_Z:
            z = z_next.to(tl.float32)
            z_next = tl.load(z_row + ahead * stride_zt + d * stride_zd, mask=live_d, other=0.0)
            y *= z / (1.0 + tl.exp(-z))  # SiLU gate
        tl.store(y_row + t * channels + d, y.to(y_ptr.dtype.element_ty), mask=live_d)
    for t in range(real, length):  # the padding's outputs, never read: zeros rather than what memory held
        tl.store(y_row + t * channels + d, tl.zeros((BLOCK_D,), y_ptr.dtype.element_ty), mask=live_d)
    tl.store(h_ptr + b * channels * states + d[:, None] * states + n[None, :], h, mask=dn)


def mamba1_short_scan(x: Tensor, dt: Tensor, dt_bias: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                      z: Tensor | None, h0: Tensor | None, delta_scale: Tensor | None,
                      lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba1's scan of a batch of chunks, before the output projection. x, dt, z (b, l, d) and B, C (b, l, n) with
    any strides (the CUDA back-end's short path hands them on token-major, which each step loads whole); dt before
    the bias and softplus; dt_bias, D (d,); A (d, n) or, per sequence, (b, d, n); h0 (b, d, n) or None for zeros;
    delta_scale (b, d) float32 or None; lengths (b,) integer, each row's real tokens (rows padded on the right),
    or None: all l. Returns y (b, l, d) dense in x's dtype (0 past a row's length) and the state after each row's
    last real token (b, d, n) float32 dense."""
    b, l, d = x.shape
    n = A.shape[-1]
    assert all(t is None or t.stride(-1) == 1 for t in (A, h0, delta_scale))
    assert lengths is None or lengths.is_contiguous()
    y = torch.empty(b, l, d, dtype=x.dtype, device=x.device)
    h = torch.empty(b, d, n, dtype=torch.float32, device=x.device)
    unused = x  # a placeholder pointer where an optional input is absent (its constexpr flag is off)
    block = launch_classes.scan_channels(b, d)  # a program's channels (the kernel's launch shape)
    _short_scan_kernel[(triton.cdiv(d, block), b)](
        x, dt, dt_bias, delta_scale if delta_scale is not None else unused, A, B, C, D, z if z is not None else unused,
        h0 if h0 is not None else unused, lengths if lengths is not None else unused, y, h, l, d, n, *x.stride(),
        *dt.stride(), *(z.stride() if z is not None else (0, 0, 0)), *B.stride(), *C.stride(),
        delta_scale.stride(0) if delta_scale is not None else 0, 0 if A.dim() == 2 else A.stride(0), A.stride(-2),
        *(h0.stride()[:2] if h0 is not None else (0, 0)),
        HAS_SCALE=delta_scale is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None,
        THRESHOLD=SOFTPLUS_THRESHOLD, BLOCK_D=block, BLOCK_N=triton.next_power_of_2(n), num_warps=SCAN_WARPS)
    return y, h


@jit
def _mamba2_short_scan_kernel(
        # tensors
        x_ptr: tl.tensor, delta_ptr: tl.tensor, A_ptr: tl.tensor, B_ptr: tl.tensor, C_ptr: tl.tensor, D_ptr: tl.tensor,
        h0_ptr: tl.tensor, lengths_ptr: tl.tensor, y_ptr: tl.tensor, h_ptr: tl.tensor,
        # sizes and strides (batch, token, head and channel ones of x; batch, token, group ones of B, C)
        length: tl.tensor, heads: tl.tensor, head_dim: tl.tensor, states: tl.tensor, heads_per_group: tl.tensor,
        stride_xb: tl.tensor, stride_xt: tl.tensor, stride_xh: tl.tensor, stride_xp: tl.tensor,
        stride_Bb: tl.tensor, stride_Bt: tl.tensor, stride_Bg: tl.tensor, stride_Bn: tl.tensor, stride_Cb: tl.tensor,
        stride_Ct: tl.tensor, stride_Cg: tl.tensor, stride_Cn: tl.tensor, stride_Ab: tl.tensor, stride_h0b: tl.tensor,
        stride_h0h: tl.tensor, stride_h0p: tl.tensor,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr) -> None:
    """Channels i (BLOCK_P,) of head `head` of sequence b, token by token: h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t ⊗ B_t,
    y_t = h_t C_t + D x_t; then the last state. Δ (b, l, h) and y (b, l, h, p) and h (b, h, p, n) dense. With
    lengths, row b stops at its own, as Mamba1's kernel does."""
    b = tl.program_id(2).to(tl.int64)
    head = tl.program_id(1)
    i = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    live_p, live_n = i < head_dim, n < states
    pn = live_p[:, None] & live_n[None, :]  # (BLOCK_P, BLOCK_N)
    A = tl.load(A_ptr + b * stride_Ab + head).to(tl.float32)
    skip = tl.load(D_ptr + head).to(tl.float32)
    group = head // heads_per_group
    if HAS_H0:
        h = tl.load(h0_ptr + b * stride_h0b + head * stride_h0h + i[:, None] * stride_h0p + n[None, :], mask=pn,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + b * stride_xb + head * stride_xh
    B_row, C_row = B_ptr + b * stride_Bb + group * stride_Bg, C_ptr + b * stride_Cb + group * stride_Cg
    delta_row = delta_ptr + b * length * heads + head
    y_row = y_ptr + (b * length * heads + head) * head_dim
    real = row_length(lengths_ptr, b, length, HAS_LENGTHS)
    delta_next = tl.load(delta_row)  # the next token's inputs loaded a step ahead, as in Mamba1's kernel
    x_next = tl.load(x_row + i * stride_xp, mask=live_p, other=0.0)
    B_next = tl.load(B_row + n * stride_Bn, mask=live_n, other=0.0)
    C_next = tl.load(C_row + n * stride_Cn, mask=live_n, other=0.0)
    for t in range(real):
        delta, x, B, C = delta_next, x_next.to(tl.float32), B_next.to(tl.float32), C_next.to(tl.float32)
        ahead = tl.minimum(t + 1, real - 1)
        delta_next = tl.load(delta_row + ahead * heads)
        x_next = tl.load(x_row + ahead * stride_xt + i * stride_xp, mask=live_p, other=0.0)
        B_next = tl.load(B_row + ahead * stride_Bt + n * stride_Bn, mask=live_n, other=0.0)
        C_next = tl.load(C_row + ahead * stride_Ct + n * stride_Cn, mask=live_n, other=0.0)
        h = h * tl.exp(delta * A) + (delta * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1) + skip * x
        tl.store(y_row + t * heads * head_dim + i, y, mask=live_p)
    for t in range(real, length):  # the padding's outputs, never read: zeros rather than what memory held
        tl.store(y_row + t * heads * head_dim + i, tl.zeros((BLOCK_P,), tl.float32), mask=live_p)
    h_row = h_ptr + (b * heads + head) * head_dim * states
    tl.store(h_row + i[:, None] * states + n[None, :], h, mask=pn)


def mamba2_short_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None,
                      lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba2's scan of a batch of chunks on a discretised Δ: x (b, l, h, p) and B, C (b, l, g, n) with any strides
    (views of the convolution's output); delta (b, l, h) float32; A (h,) or, per sequence, (b, h); D (h,); h0
    (b, h, p, n) or None for zeros; lengths (b,) as `mamba1_short_scan`'s. Returns y (b, l, h, p) float32 with the
    D skip (0 past a row's length), and the state after each row's last real token (b, h, p, n) float32, both
    dense."""
    b, l, heads, p = x.shape
    groups, n = B.shape[-2:]
    assert (h0 is None or h0.stride(-1) == 1) and (lengths is None or lengths.is_contiguous())
    delta = delta.float().contiguous()
    y = torch.empty(b, l, heads, p, dtype=torch.float32, device=x.device)
    h = torch.empty(b, heads, p, n, dtype=torch.float32, device=x.device)
    _mamba2_short_scan_kernel[(triton.cdiv(p, BLOCK_HEAD_CHANNELS), heads, b)](
        x, delta, A, B, C, D, h0 if h0 is not None else x, lengths if lengths is not None else x, y, h, l, heads, p, n,
        heads // groups, *x.stride(), *B.stride(), *C.stride(), 0 if A.dim() == 1 else A.stride(0),
        *(h0.stride()[:3] if h0 is not None else (0, 0, 0)),
        HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, BLOCK_P=BLOCK_HEAD_CHANNELS,
        BLOCK_N=triton.next_power_of_2(n), num_warps=SCAN_WARPS)
    return y, h
