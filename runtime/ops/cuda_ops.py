"""`mamba_ssm` (and optionally `causal_conv1d`) kernels behind the signatures of `torch_ops`.

Imported only when the CUDA back-end is chosen, so a missing package is an error at load time, never a
silent fallback inside `forward`.

Scales reach the unchanged kernels as DESIGN.md §2 says. Mamba2's Δ is passed already softplus'ed, clamped
and scaled (`dt_softplus=False`), which is exact for any per-sequence Δ scale. Mamba1's scan discretises Δ
itself; a sequence's Δ scale s is folded exactly into A' = s·A, D' = D/s and the input s·x (which the
convolution's SiLU kernel writes beside x), and an A-spectrum A' = s·A into the kernel's shared A, one sequence
at a time in prefill (for a batch of several, `mamba1_scan` folds each in turn). Mamba1 decode runs the fused
Triton kernels of `triton_decode`, four per layer for a batch of a few: the residual + RMSNorm + in_proj; x_proj
of the convolved input; the convolution step, dt_proj and the state update with its per-sequence scales; out_proj
(the projections as GEMVs; cuBLAS for larger batches). States are read and written in the pool's rows.
mamba_ssm's own step takes more kernels and could not take one A per sequence. Mamba1 prefill from a carried
state runs the PyTorch scan: `selective_scan_fn` takes no initial state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

from . import torch_ops, triton_channels, triton_decode

try:  # the convolution kernels are a separate, optional package; the PyTorch conv is exact too
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None

HAS_CONV_KERNELS = causal_conv1d_fn is not None
SSD_CHUNK = 256  # chunk length of mamba_chunk_scan_combined; the result does not depend on it


def causal_conv1d(x, weight, bias, state):
    """Same contract as `torch_ops.causal_conv1d`. x: (b, l, c); state: (b, c, k-1) or None.
    Runs on the channels-first layout the projections produce and returns that layout's (b, l, c) view,
    which the scan reads without a copy; without `causal_conv1d`, as cuDNN's grouped convolution (what raw
    mamba_ssm runs then too) rather than the PyTorch ops' shifted multiply-adds, which suit CPUs, and its SiLU
    as a Triton kernel (PyTorch's reads the slice of the padded output unvectorised)."""
    y, _, new_state = _convolve(x, weight, bias, state, None)
    return y, new_state


def causal_conv1d_scaled(x, weight, bias, state, scale):
    """Same contract as `torch_ops.causal_conv1d_scaled`, in `causal_conv1d`'s layout. Without `causal_conv1d`
    the scaled copy comes out of the SiLU's kernel; with it, from a pass of its own."""
    return _convolve(x, weight, bias, state, scale)


def _convolve(x, weight, bias, state, scale):
    """Both convolutions above: (y, y · scale or None, new state), y (b, l, c) views of (b, c, l) storage."""
    k = weight.shape[-1]
    x = x.transpose(1, 2)  # (b, c, l)
    if state is not None:
        x = torch.cat((state.to(x.dtype), x), dim=-1)  # (b, c, k-1+l)
    if HAS_CONV_KERNELS:
        y = causal_conv1d_fn(x, weight, bias, activation="silu")  # (b, c, l or k-1+l)
        scaled = None if scale is None else scale_channels(y.transpose(1, 2), scale).transpose(1, 2)
    else:
        y, scaled = triton_channels.silu(F.conv1d(x, weight[:, None].to(x.dtype), None if bias is None
                                                  else bias.to(x.dtype), padding=k - 1, groups=x.shape[1]),
                                         x.shape[-1], scale)  # (b, c, l or k-1+l) each
    if state is not None:
        y, scaled = y[..., k - 1:], None if scaled is None else scaled[..., k - 1:]
    new_state = F.pad(x[..., -(k - 1):], (max(0, k - 1 - x.shape[-1]), 0))  # (b, c, k-1)
    return y.transpose(1, 2), None if scaled is None else scaled.transpose(1, 2), new_state.contiguous()


scale_channels = triton_channels.scale_channels  # one vectorised pass where PyTorch broadcasts unvectorised
causal_conv1d_step = triton_decode.causal_conv1d_step  # one kernel that reads and writes the pool's rows
add_rms_norm = triton_decode.add_rms_norm
add_rms_norm_linear = triton_decode.add_rms_norm_linear  # the norm fused into in_proj for a batch of a few
linear = triton_decode.linear  # out_proj of a batch of a few as a GEMV
mamba1_step = triton_decode.mamba1_step  # per-sequence Δ and A scales, and identity, in one kernel
mamba1_decode = triton_decode.mamba1_decode  # convolution, x_proj, dt_proj and the state update in two kernels


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i:i + 1]


def _stack(outs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(outs) == 1:  # no copy: a cat would also rewrite a channels-first view into (b, l, d) memory
        return outs[0]
    return torch.cat([y for y, _ in outs]), torch.cat([h for _, h in outs])


def mamba1_scan(x, dt, dt_bias, delta_scale, A, B, C, D, z, h0, out_weight, out_bias):
    """Same contract as `torch_ops.mamba1_scan`; inputs are (b, l, ·) views of (b, ·, l) storage.

    The kernel discretises Δ itself (softplus of dt + bias, in float32) as in raw mamba_ssm. A Δ scale s
    is folded exactly, one sequence at a time (DESIGN.md §2): Δ' = s·Δ is A' = s·A with input x' = s·x and
    skip D' = D/s, so the kernel's state and output are the scaled model's own."""
    if h0 is not None:
        return torch_ops.mamba1_scan(x, dt, dt_bias, delta_scale, A, B, C, D, z, h0, out_weight, out_bias)
    if delta_scale is None and A.dim() == 2:
        y, h = _selective_scan(x, dt, dt_bias, A, B, C, D.float(), z)
        return F.linear(y, out_weight, out_bias), h
    outs = []
    for i in range(x.shape[0]):
        x_i, A_i, D_i = _row(x, i), A if A.dim() == 2 else A[i], D.float()  # (1, l, d), (d, n), (d,)
        if delta_scale is not None:  # (an A-spectrum scale alone is already in A_i)
            A_i, D_i = torch_ops.fold_delta_scale(A_i, D_i, delta_scale[i])
            x_i = scale_channels(x_i, delta_scale[i:i + 1])  # (1, l, d), layout kept
        y, h = _selective_scan(x_i, _row(dt, i), dt_bias, A_i, _row(B, i), _row(C, i), D_i, _row(z, i))
        outs.append((F.linear(y, out_weight, out_bias), h))
    return _stack(outs)


def _selective_scan(x, dt, dt_bias, A, B, C, D, z):
    """selective_scan_fn on (b, l, ·) views; returns y (b, l, d) and the last state (b, d, n) float32.
    The kernel wants Δ, B, C and z in x's dtype (under autocast the PyTorch conv leaves x in float32)."""
    same = lambda t: None if t is None else t.to(x.dtype).transpose(1, 2)  # noqa: E731  (b, l, ·) -> (b, ·, l)
    y, h = selective_scan_fn(x.transpose(1, 2), same(dt), A, same(B), same(C), D, same(z), dt_bias.float(), True,
                             return_last_state=True)
    # The kernel's last state is a strided view (stride 2 over n) into its (b, d, chunks, 2n) buffer: copied out,
    # so decode kernels get the contiguous state they assume and the buffer is freed.
    return y.transpose(1, 2), h.float().contiguous()  # (b, l, d), (b, d, n)


def mamba2_scan(x, dt, A, B, C, D, h0):
    """x: (b, l, h, p); dt: (b, l, h); A: (h,) or (b, h); B, C: (b, l, g, n). Returns y, h (b, h, p, n)."""
    if A.dim() == 2:
        return _stack([mamba2_scan(_row(x, i), _row(dt, i), A[i], _row(B, i), _row(C, i), D, _row(h0, i))
                       for i in range(A.shape[0])])
    y, h = mamba_chunk_scan_combined(
        x, dt, A, B, C, SSD_CHUNK, D=D.float(), initial_states=h0, dt_softplus=False, return_final_states=True
    )
    return y, h.float()


def mamba2_step(h, x, dt, A, B, C, D, slots=None):
    """Same contract as `torch_ops.mamba2_step`; h (b, h, p, n) float32 (or a pool, with `slots`) updated in place."""
    if A.dim() == 2:
        return torch_ops.mamba2_step(h, x, dt, A, B, C, D, slots)
    heads, p, n = h.shape[1:]
    # The kernel takes per-(head, channel) parameters; stride-0 views make it treat them per head.
    # A zero dt_bias is passed because the kernel reads its stride to detect that tying.
    tie = lambda t: t[:, None].expand(heads, p)  # noqa: E731  (h,) -> (h, p)
    return torch_ops.on_rows(h, slots, lambda rows: selective_state_update(
        rows, x, dt[..., None].expand(-1, heads, p), A[:, None, None].expand(heads, p, n), B, C,
        tie(D.float()), None, tie(dt.new_zeros(heads)), False,
    ))
