"""A Mamba1 scan continued from a state, on mamba_ssm's scan kernel, which starts every sequence from zero.

The state is linear in where it starts: scanned from h0, h_t = h⁰_t + exp(A·S_t) ⊙ h0 with S_t = Δ_1 + … + Δ_t
(each step's decay exp(Δ_t·A) multiplies), so the output before the z gate is y_t = y⁰_t + C_t · (exp(A·S_t) ⊙ h0).
`add_initial_state` adds those terms, exactly, to a scan from zero: to its gated output and to its last state, in
place, in one kernel that reads dt, C and z once. Shapes: b sequences, l tokens, d channels, n states. Triton's
interpreter (TRITON_INTERPRET=1) runs it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import jit
from .triton_ssm import SOFTPLUS_THRESHOLD, softplus

Tensor = torch.Tensor

BLOCK_CHANNELS = 16  # channels per program
DECAY_TILE = 8192  # decays a program holds at once, (channels, states, tokens): the tokens of a step follow


@jit
def _initial_state_kernel(
        # tensors
        y_ptr: tl.tensor, h_ptr: tl.tensor, h0_ptr: tl.tensor, dt_ptr: tl.tensor, dt_bias_ptr: tl.tensor,
        A_ptr: tl.tensor, C_ptr: tl.tensor, z_ptr: tl.tensor,
        # sizes and strides (token, channel and state strides of every (b, l, ·) and (b, d, n) tensor)
        length: tl.tensor, channels: tl.tensor, states: tl.tensor, stride_yb: tl.tensor, stride_yt: tl.tensor,
        stride_yd: tl.tensor, stride_hb: tl.tensor, stride_hd: tl.tensor, stride_h0b: tl.tensor, stride_h0d: tl.tensor,
        stride_dtb: tl.tensor, stride_dtt: tl.tensor, stride_dtd: tl.tensor, stride_Ab: tl.tensor,
        stride_Ad: tl.tensor, stride_Cb: tl.tensor, stride_Ct: tl.tensor, stride_Cn: tl.tensor, stride_zb: tl.tensor,
        stride_zt: tl.tensor, stride_zd: tl.tensor,
        HAS_Z: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr) -> None:
    """Channels d (BLOCK_D,) of sequence b: y_t += C_t · (exp(A·S_t) ⊙ h0) (times SiLU(z_t)) for every token,
    then h_l += exp(A·S_l) ⊙ h0."""
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    live_d = d < channels
    dn = live_d[:, None] & (n[None, :] < states)  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + b * stride_Ab + d[:, None] * stride_Ad + n[None, :], mask=dn, other=0.0).to(tl.float32)
    h0 = tl.load(h0_ptr + b * stride_h0b + d[:, None] * stride_h0d + n[None, :], mask=dn, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + d, mask=live_d, other=0.0).to(tl.float32)
    S = tl.zeros((BLOCK_D,), dtype=tl.float32)  # Δ summed over the tokens walked so far
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        dt_ = live_d[:, None] & (t[None, :] < length)  # (BLOCK_D, BLOCK_T)
        dt = tl.load(dt_ptr + b * stride_dtb + t[None, :] * stride_dtt + d[:, None] * stride_dtd, mask=dt_,
                     other=0.0).to(tl.float32)
        delta = tl.where(dt_, softplus(dt + bias[:, None], THRESHOLD), 0.0)  # (BLOCK_D, BLOCK_T); 0 past the end
        at = S[:, None] + tl.cumsum(delta, axis=1)  # (BLOCK_D, BLOCK_T): S_t
        C = tl.load(C_ptr + b * stride_Cb + t[None, :] * stride_Ct + n[:, None] * stride_Cn,
                    mask=(n[:, None] < states) & (t[None, :] < length), other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_T)
        decay = tl.exp(A[:, :, None] * at[:, None, :])  # (BLOCK_D, BLOCK_N, BLOCK_T)
        added = tl.sum(decay * h0[:, :, None] * C[None, :, :], axis=1)  # (BLOCK_D, BLOCK_T)
        if HAS_Z:
            z = tl.load(z_ptr + b * stride_zb + t[None, :] * stride_zt + d[:, None] * stride_zd, mask=dt_,
                        other=0.0).to(tl.float32)
            added *= z / (1.0 + tl.exp(-z))  # the scan's gate is linear in its input: it gates the addition alike
        y_at = y_ptr + b * stride_yb + t[None, :] * stride_yt + d[:, None] * stride_yd
        y = tl.load(y_at, mask=dt_, other=0.0).to(tl.float32) + added
        tl.store(y_at, y.to(y_ptr.dtype.element_ty), mask=dt_)
        S += tl.sum(delta, axis=1)
    h_at = h_ptr + b * stride_hb + d[:, None] * stride_hd + n[None, :]
    h = tl.load(h_at, mask=dn, other=0.0) + tl.exp(A * S[:, None]) * h0
    tl.store(h_at, h, mask=dn)


def add_initial_state(y: Tensor, h: Tensor, h0: Tensor, dt: Tensor, dt_bias: Tensor, A: Tensor, C: Tensor,
                      z: Tensor | None) -> None:
    """Makes a Mamba1 scan from zero one from h0, in place: y (b, l, d) its output (the D skip in, gated by
    SiLU(z) where z is given), h (b, d, n) float32 its last state; h0 (b, d, n); dt (b, l, d) before the bias
    and softplus; dt_bias (d,); A (d, n) or, per sequence, (b, d, n) (a Δ scale folded in, as the scan took it);
    C (b, l, n); z (b, l, d) or None. Any strides but a unit one along n."""
    b, l, d = y.shape
    n = h.shape[-1]
    assert h.dtype == torch.float32 and h.stride(-1) == 1 and h0.stride(-1) == 1 and A.stride(-1) == 1
    A_stride_b = 0 if A.dim() == 2 else A.stride(0)
    block_n = triton.next_power_of_2(n)
    _initial_state_kernel[(triton.cdiv(d, BLOCK_CHANNELS), b)](
        y, h, h0, dt, dt_bias, A, C, z if z is not None else y, l, d, n, y.stride(0), y.stride(1), y.stride(2),
        h.stride(0), h.stride(1), h0.stride(0), h0.stride(1), dt.stride(0), dt.stride(1), dt.stride(2), A_stride_b,
        A.stride(-2), C.stride(0), C.stride(1), C.stride(2), *(z.stride() if z is not None else (0, 0, 0)),
        HAS_Z=z is not None, THRESHOLD=SOFTPLUS_THRESHOLD, BLOCK_N=block_n, BLOCK_D=BLOCK_CHANNELS,
        BLOCK_T=max(16, DECAY_TILE // (BLOCK_CHANNELS * block_n)))
