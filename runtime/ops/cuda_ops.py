"""`mamba_ssm` (and optionally `causal_conv1d`) kernels behind the operator contract (`contract.Ops`).

Imported only when the CUDA back-end is chosen, so a missing package is an error at load time, never a
silent fallback inside `forward`.

Scales reach the unchanged kernels exactly (docs/ARCHITECTURE.md, the scale maths). Mamba2's Δ is discretised
here, softplus'ed, clamped and scaled, and passed to the kernels as is (`dt_softplus=False`), exact for any
per-sequence Δ scale. Mamba1's scan discretises Δ itself; a sequence's Δ scale s is folded exactly into
A' = s·A, D' = D/s and the input s·x (which the convolution's SiLU kernel writes beside x), and an A-spectrum
A' = s·A into the kernel's shared A, one sequence at a time in prefill (for a batch of several, `mamba1_scan`
folds each in turn). Mamba1 decode runs the fused Triton kernels of `triton_ssm` and `triton_gemv` for a batch
of a few: the residual + RMSNorm + in_proj; x_proj of the convolved input; the convolution step, dt_proj and
the state update with its per-sequence scales; out_proj (the projections as GEMVs; cuBLAS for larger
batches). States are read and written in the pool's rows. mamba_ssm's own step takes more kernels and could
not take one A per sequence. Mamba2 decode runs `triton_mamba2`'s kernels at any batch (the convolution step,
the state update with its per-sequence scales, the gated RMSNorm), between the same GEMV projections; its
prefill hands the scan's output to the same gated-norm kernel. Mamba1 prefill from a carried state runs
`selective_scan_fn` from zero (it takes no initial state) and adds the state's terms after it
(`triton_scan_state`). A short chunk (`launch_classes.SHORT_CHUNK`), as a burst of short prompts makes, runs
one convolution kernel (`triton_short_conv`) and the scan of `triton_short_scan`, which takes states, an A and (for
Mamba1) a Δ scale per sequence in one launch, for either architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

from ..padding import Padding
from . import (torch_ops, triton_channels, triton_gemv, triton_mamba2, triton_scan_state, triton_short_conv,
               triton_short_scan, triton_ssm)
from .launch_classes import SHORT_CHUNK, SSD_CHUNK

try:  # the convolution kernels are a separate, optional package; the PyTorch conv is exact too
    from causal_conv1d import causal_conv1d_fn

    HAS_CONV_KERNELS = True
except ImportError:
    HAS_CONV_KERNELS = False

Tensor = torch.Tensor


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                  padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.causal_conv1d`. x: (b, l, c); state: (b, c, k-1) or None.
    Runs on the channels-first layout the projections produce for a long chunk and returns that layout's (b, l, c)
    view, which the scan reads without a copy; without `causal_conv1d`, as cuDNN's grouped convolution (what raw
    mamba_ssm runs then too) rather than the PyTorch ops' shifted multiply-adds, which suit CPUs, and its SiLU
    as a Triton kernel (PyTorch's reads the slice of the padded output unvectorised)."""
    y, _, new_state = _convolve(x, weight, bias, state, None, padding)
    return y, new_state


def causal_conv1d_scaled(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                         scale: Tensor, padding: Padding | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`contract.Ops.causal_conv1d_scaled`, in `causal_conv1d`'s layout. Without `causal_conv1d` the scaled
    copy comes out of the SiLU's kernel; with it, from a pass of its own."""
    y, scaled, new_state = _convolve(x, weight, bias, state, scale, padding)
    assert scaled is not None
    return y, scaled, new_state


def _convolve(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None, scale: Tensor | None,
              padding: Padding | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Both convolutions above: (y, y · scale or None, new state), y (b, l, c) views of dense (b, c, l) storage:
    mamba_ssm's scan loads its rows in 16-byte vectors, so a row may not start k-1 elements into a buffer. A chunk
    of at most SHORT_CHUNK tokens is one kernel (`triton_short_conv`, its output token-major, each row's state at
    its own end) unless autograd records it."""
    if x.shape[1] <= SHORT_CHUNK and not torch_ops.records_autograd(x, weight, bias, state, scale):
        return triton_short_conv.short_causal_conv1d(x, weight, bias, state, scale, _lengths(padding))
    if padding is not None:
        y, scaled, _ = _convolve(x, weight, bias, state, scale, None)
        return y, scaled, padding.conv_state(x, state)
    k = weight.shape[-1]
    x = x.transpose(1, 2)  # (b, c, l)
    carried = 0 if state is None else k - 1  # leading positions that are the state's, not outputs
    if state is not None:
        x = torch.cat((state.to(x.dtype), x), dim=-1)  # (b, c, k-1+l)
    if HAS_CONV_KERNELS:
        y = causal_conv1d_fn(x, weight, bias, activation="silu")[..., carried:].contiguous()  # (b, c, l)
        scaled = None if scale is None else scale_channels(y.transpose(1, 2), scale).transpose(1, 2)
    else:
        convolved = F.conv1d(x, weight[:, None].to(x.dtype), None if bias is None else bias.to(x.dtype),
                             padding=k - 1, groups=x.shape[1])  # (b, c, carried + l + k-1)
        y, scaled = triton_channels.silu(convolved[..., carried:], x.shape[-1] - carried, scale)  # (b, c, l) each
    new_state = F.pad(x[..., -(k - 1):], (max(0, k - 1 - x.shape[-1]), 0))  # (b, c, k-1)
    return y.transpose(1, 2), None if scaled is None else scaled.transpose(1, 2), new_state.contiguous()


scale_channels = triton_channels.scale_channels  # one vectorised pass where PyTorch broadcasts unvectorised
causal_conv1d_step = triton_ssm.causal_conv1d_step  # one kernel that reads and writes the pool's rows
add_rms_norm = triton_gemv.add_rms_norm
add_rms_norm_linear = triton_gemv.add_rms_norm_linear  # the norm fused into in_proj for a batch of a few
linear = triton_gemv.linear  # out_proj of a batch of a few as a GEMV
mamba1_step = triton_ssm.mamba1_step  # per-sequence Δ and A scales, and identity, in one kernel
mamba1_decode = triton_ssm.mamba1_decode  # convolution, x_proj, dt_proj and the state update in two kernels
mamba2_step = triton_mamba2.mamba2_step  # per-sequence Δ and A scales per head, and identity, in one kernel
mamba2_decode = triton_mamba2.mamba2_decode  # convolution step, state update and gated norm in three kernels
gated_rms_norm = triton_mamba2.gated_rms_norm  # one pass where PyTorch writes (l, d) float32 intermediates


def _lengths(padding: Padding | None) -> Tensor | None:
    """Each padded row's length (b,), as the short-chunk kernels take it; None for rows of one length."""
    return None if padding is None else padding.ends


def _row(t: Tensor, i: int) -> Tensor:
    return t[i:i + 1]


def _row_or_none(t: Tensor | None, i: int) -> Tensor | None:
    return None if t is None else _row(t, i)


def _stack(outs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    if len(outs) == 1:  # no copy: a cat would also rewrite a channels-first view into (b, l, d) memory
        return outs[0]
    return torch.cat([y for y, _ in outs]), torch.cat([h for _, h in outs])


def mamba1_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                h0: Tensor | None, *, dt_bias: Tensor, delta_scale: Tensor | None, out_weight: Tensor,
                out_bias: Tensor | None, padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.mamba1_scan`; a long chunk's inputs are (b, l, ·) views of (b, ·, l) storage, a short one's
    token-major. A chunk of at most SHORT_CHUNK tokens, for which mamba_ssm's kernel is built poorly, runs
    `triton_short_scan` (one launch for the batch, its states, A's and Δ scales whatever they are, each row
    stopping at its own end) unless autograd records the scan (that kernel has no backward); a longer one
    `long_chunk_scan`."""
    if x.shape[1] <= SHORT_CHUNK and not torch_ops.records_autograd(x, dt, A, B, C, D, z, h0, dt_bias, delta_scale):
        y, h = triton_short_scan.mamba1_short_scan(x, dt, dt_bias, A, B, C, D, z, h0, delta_scale, _lengths(padding))
    else:
        dt = dt if padding is None else padding.silence(dt)
        y, h = long_chunk_scan(x, dt, A, B, C, D, z, h0, dt_bias=dt_bias, delta_scale=delta_scale)
    return F.linear(y, out_weight, out_bias), h  # (b, l, D), (b, d, n)


def long_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                    h0: Tensor | None, *, dt_bias: Tensor, delta_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """`mamba1_scan` before the projection on mamba_ssm's kernel: y (b, l, d) and the last state (b, d, n) float32.

    The kernel discretises Δ itself (softplus of dt + bias, in float32) as in raw mamba_ssm. A Δ scale s
    is folded exactly, one sequence at a time: Δ' = s·Δ is A' = s·A with input x' = s·x and skip D' = D/s,
    so the kernel's state and output are the scaled model's own. The kernel starts from zero: a scan from a
    state h0 adds h0's terms after it (`triton_scan_state`), exactly, as the state is linear in its start."""
    one_A = delta_scale is None and A.dim() == 2  # every sequence scanned with A as it is
    As: list[Tensor] = []  # otherwise the A each sequence was scanned with, its Δ scale folded in
    if one_A:
        y, h = _selective_scan(x, dt, dt_bias, A, B, C, D.float(), z)
    else:
        outs = []
        for i in range(x.shape[0]):
            x_i, A_i, D_i = _row(x, i), A if A.dim() == 2 else A[i], D.float()  # (1, l, d), (d, n), (d,)
            if delta_scale is not None:  # (an A-spectrum scale alone is already in A_i)
                A_i, D_i = torch_ops.fold_delta_scale(A_i, D_i, delta_scale[i])
                x_i = scale_channels(x_i, delta_scale[i:i + 1])  # (1, l, d), layout kept
            outs.append(_selective_scan(x_i, _row(dt, i), dt_bias, A_i, _row(B, i), _row(C, i), D_i,
                                        _row_or_none(z, i)))
            As.append(A_i)
        y, h = _stack(outs)
    if h0 is not None:  # A (d, n), or per sequence (b, d, n)
        triton_scan_state.add_initial_state(y, h, h0, dt, dt_bias, A if one_A else torch.stack(As), C, z)
    return y, h


def _selective_scan(x: Tensor, dt: Tensor, dt_bias: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                    z: Tensor | None) -> tuple[Tensor, Tensor]:
    """selective_scan_fn on (b, l, ·) views; returns y (b, l, d) and the last state (b, d, n) float32.
    The kernel wants Δ, B, C and z in x's dtype (under autocast the PyTorch conv leaves x in float32)."""

    def same(t: Tensor) -> Tensor:  # (b, l, ·) -> (b, ·, l)
        return t.to(x.dtype).transpose(1, 2)

    y, h = selective_scan_fn(x.transpose(1, 2), same(dt), A, same(B), same(C), D, None if z is None else same(z),
                             dt_bias.float(), True, return_last_state=True)
    # The kernel's last state is a strided view (stride 2 over n) into its (b, d, chunks, 2n) buffer: copied out,
    # so decode kernels get the contiguous state they assume and the buffer is freed.
    return y.transpose(1, 2), h.float().contiguous()  # (b, l, d), (b, d, n)


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None, *,
                dt_bias: Tensor, dt_limit: tuple[float, float], delta_scale: Tensor | None,
                padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.mamba2_scan`: x (b, l, h, p); dt (b, l, h); A (h,) or (b, h); B, C (b, l, g, n). Δ is
    discretised here; a chunk of at most SHORT_CHUNK tokens runs `triton_short_scan` (one launch whatever the A's,
    each row stopping at its own end) unless autograd records the scan, a longer one `long_chunk_ssd_scan`."""
    short = x.shape[1] <= SHORT_CHUNK and not torch_ops.records_autograd(x, dt, A, B, C, D, h0, dt_bias, delta_scale)
    if padding is not None and not short:
        dt = padding.silence(dt)
    delta = torch_ops.discretise(dt, dt_bias, delta_scale, dt_limit)  # (b, l, h) float32
    if short:
        return triton_short_scan.mamba2_short_scan(x, delta, A, B, C, D, h0, _lengths(padding))
    return long_chunk_ssd_scan(x, delta, A, B, C, D, h0)


def long_chunk_ssd_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                        h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """The SSD kernel on a discretised Δ (b, l, h) float32, one sequence at a time where A is per sequence."""
    if A.dim() == 2:
        return _stack([long_chunk_ssd_scan(_row(x, i), _row(delta, i), A[i], _row(B, i), _row(C, i), D,
                                           _row_or_none(h0, i)) for i in range(A.shape[0])])
    y, h = mamba_chunk_scan_combined(
        x, delta, A, B, C, SSD_CHUNK, D=D.float(), initial_states=h0, dt_softplus=False, return_final_states=True
    )
    return y, h.float()
