"""Pure-PyTorch operators: exact, vectorised over blocks of time, differentiable, any device.

Shape letters: b batch, l sequence, T block length, d d_inner (Mamba1 channels), c conv channels,
k conv width, n d_state, h heads, p head dim, g groups (Mamba2 B/C groups), r = h / g heads per group.

Mamba1 scan, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t. The sequence is cut into blocks of T tokens. Every
block is first scanned from a zero state (a loop over T positions, each step one vectorised operation over
all blocks at once), keeping the running product of its decays; a loop over blocks then carries the true
state into each block, and h_t = local_t + decay_t · h_start. Only products of decays ≤ 1: no exponent is
ever negated, so there is no overflow to guard against whatever Δ does, and the result is the sequential
recurrence up to float32 rounding. Python loops run T + tokens/T times per super-block, not once per token.
Without autograd (prefill), the same arithmetic runs in place in two buffers reused by every super-block:
no per-step tensors to stack, no allocation per super-block (the scan is memory-bound on CPUs). On CPU
without autograd the compiled kernel of cpu_scan runs instead where a C compiler is found (it keeps each
channel's state in cache); this in-place path is its fallback. On CPU in float32 with autograd, the kernels of
cpu_scan_grad (a compiled backward pass) run instead of the differentiable blocked scan.

Mamba2 scan (SSD). A is a scalar per head, so within a block the decays exp(S_t - S_s), t ≥ s, form a
(T, T) matrix per head and the block is two matrix products plus the carried state (Dao & Gu, 2024).
Every exponent is ≤ 0: no overflow for any block length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime.ops import cpu_decode, cpu_scan, cpu_scan_grad
from runtime.ops.contract import Mamba1Weights, Mamba2Weights
from runtime.padding import Padding

Tensor = torch.Tensor

SCAN_BLOCK = 16  # Mamba1: T, positions per block
SUPERBLOCK_ELEMENTS = 1 << 20  # Mamba1: elements of one (b, tokens, d, n) intermediate per super-block
SSD_BLOCK = 64  # Mamba2 block: the per-head (T, T) decay matrix costs T per token


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (calibration back-propagates through the scales): the
    kernels without a backward (the compiled CPU scan, the Triton channel kernels) then leave it to PyTorch."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                  padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    """Depth-wise causal convolution then SiLU, in the (b, l, c) layout the projections produce.

    x: (b, l, c); weight: (c, k); bias: (c,); state: (b, c, k-1), the inputs before x, or None for zeros.
    Returns y (b, l, c) and the new state (b, c, k-1), with `padding` each row's before its own end.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    before = x.new_zeros(b, k - 1, c) if state is None else state.transpose(1, 2).to(x.dtype)
    padded = torch.cat((before, x), dim=1)  # (b, k-1+l, c)
    # k shifted multiply-adds over contiguous rows: faster on CPUs than a grouped conv on transposed data
    y = padded[:, :l] * weight[:, 0]
    for j in range(1, k):
        y = y.addcmul(padded[:, j:j + l], weight[:, j])
    if bias is not None:
        y = y + bias
    new_state = padded[:, l:].transpose(1, 2).contiguous() if padding is None else padding.conv_state(x, state)
    return F.silu(y), new_state


def causal_conv1d_scaled(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                         scale: Tensor, padding: Padding | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`causal_conv1d` and its output times a per-sequence channel scale (b, c) float32 (`scale_channels`):
    (y, y · scale, new state), y and y · scale (b, l, c). The scaled copy is the scan's input where one
    sequence's Δ scale is folded into it (Mamba1 prefill); a GPU back-end makes it in the convolution's pass."""
    y, state = causal_conv1d(x, weight, bias, state, padding)
    return y, scale_channels(y, scale), state


def on_rows(state: Tensor, slots: Tensor | None, step: Callable[[Tensor], Tensor]) -> Tensor:
    """`step(rows)` on the rows of `state` at `slots` ((b,) int64; all rows when None), written back in place:
    a decode step on sequences that own rows of a state pool."""
    if slots is None:
        return step(state)
    rows = state.index_select(0, slots)
    out = step(rows)
    state.index_copy_(0, slots, rows)
    return out


def on_float32_rows(state: Tensor, slots: Tensor | None, step: Callable[[Tensor], Tensor]) -> Tensor:
    """`on_rows` for an SSM state, which `step` updates in float32: a state stored narrower (runtime.state) is
    widened first and rounded once as it is written back."""
    def widened(rows: Tensor) -> Tensor:
        wide = rows.float()
        out = step(wide)
        rows.copy_(wide)
        return out
    return on_rows(state, slots, step if state.dtype == torch.float32 else widened)


def scale_channels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (b, l, d) times a per-sequence, per-channel scale (b, d) float32 rounded to x's dtype. Returns (b, l, d)."""
    return x * scale[:, None, :].to(x.dtype)


def fold_delta_scale(A: Tensor, D: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """A Mamba1 Δ scale folded (docs/ARCHITECTURE.md, the scale maths): Δ' = s·Δ is exactly A' = s·A and skip
    D' = D/s on the input s·x (`scale_channels`), the state unchanged.
    A (d, n), D (d,), s (d,) -> (d, n), (d,) float32."""
    return A * s[:, None], D.float() / s


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None,
                       slots: Tensor | None = None) -> Tensor:
    """One token of `causal_conv1d`. x: (b, c); state: (b, c, k-1), or with `slots` (b,) a pool whose row
    slots[i] is sequence i's; updated in place. Returns (b, c)."""
    def conv(rows: torch.Tensor) -> torch.Tensor:
        window = torch.cat((rows, x[..., None].to(rows.dtype)), dim=-1)  # (b, c, k)
        # float32 sums rounded once, as the CUDA kernels sum (bfloat16 sums would round at every op)
        y = (window.float() * weight.float()).sum(-1)  # (b, c)
        if bias is not None:
            y = y + bias.float()
        rows.copy_(window[..., 1:])
        return F.silu(y).to(torch.result_type(window, weight))
    return on_rows(state, slots, conv)


def discretise(dt: Tensor, dt_bias: Tensor, delta_scale: Tensor | None,
               limit: tuple[float, float] | None = None) -> Tensor:
    """Δ = softplus(dt + dt_bias), clamped to `limit` (Mamba2), times s; float32. dt: (b, c) or (b, l, c) with
    c channels (Mamba1) or heads (Mamba2); delta_scale: (b, c) or None."""
    delta = F.softplus(dt.float() + dt_bias.float())
    if limit is not None:
        delta = delta.clamp(*limit)
    if delta_scale is None:
        return delta
    return delta * (delta_scale if delta.dim() == 2 else delta_scale[:, None, :])


def _mamba1_superblock(dx: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor,
                       T: int) -> tuple[Tensor, Tensor]:
    """Blocks of T tokens, all at once: a loop over the T positions inside the blocks, vectorised across
    the blocks, then a loop across the blocks that carries the state from each block's start.

    dx = Δ·x, delta: (b, m, d) with m a multiple of T; A: (b, d, n); B, C: (b, m, n); h: (b, d, n).
    Returns y (b, m, d) without the D skip and gate, and the state after the last token.
    """
    b, m, d = delta.shape
    n = A.shape[-1]
    g = m // T
    step = torch.exp(delta.view(b, g, T, d, 1) * A[:, None, None])  # (b, g, T, d, n): exp(Δ_t A)
    inputs = dx.view(b, g, T, d, 1) * B.view(b, g, T, 1, n)  # (b, g, T, d, n): Δ_t B_t x_t
    # Out-of-place steps (lists, then stack) keep the scan differentiable for back-propagated calibration.
    locals_, decays = [inputs[:, :, 0]], [step[:, :, 0]]  # per t: state from a zero block start; Π exp(Δ_s A)
    for t in range(1, T):
        locals_.append(torch.addcmul(inputs[:, :, t], step[:, :, t], locals_[-1]))
        decays.append(decays[-1] * step[:, :, t])
    local, decay = torch.stack(locals_, 2), torch.stack(decays, 2)  # (b, g, T, d, n)
    starts = []  # state entering each block
    for k in range(g):
        starts.append(h)
        h = torch.addcmul(local[:, k, -1], decay[:, k, -1], h)
    states = torch.addcmul(local, decay, torch.stack(starts, 1)[:, :, None])  # (b, g, T, d, n)
    y = torch.einsum("bgtdn,bgtn->bgtd", states, C.view(b, g, T, n)).reshape(b, m, d)  # (b, m, d)
    return y, h


def _mamba1_superblock_inplace(dx: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, T: int,
                               step_buffer: Tensor, state_buffer: Tensor) -> tuple[Tensor, Tensor]:
    """`_mamba1_superblock` without autograd, the same operations in the same order (so the same result)
    written in place: exp(Δ_t A) becomes the running decay product in `step_buffer`, the inputs become the
    states in `state_buffer` (flat buffers of at least b·m·d·n float32, reused across super-blocks)."""
    b, m, d = delta.shape
    n = A.shape[-1]
    g = m // T
    step = step_buffer[: b * m * d * n].view(b, g, T, d, n)
    torch.mul(delta.view(b, g, T, d, 1), A[:, None, None], out=step).exp_()  # exp(Δ_t A)
    states = state_buffer[: b * m * d * n].view(b, g, T, d, n)
    torch.mul(dx.view(b, g, T, d, 1), B.view(b, g, T, 1, n), out=states)  # Δ_t B_t x_t
    for t in range(1, T):
        states[:, :, t].addcmul_(step[:, :, t], states[:, :, t - 1])  # from a zero block start
        step[:, :, t].mul_(step[:, :, t - 1])  # Π_{s≤t} exp(Δ_s A)
    for k in range(g):  # carry the true state into each block
        states[:, k].addcmul_(step[:, k], h[:, None])
        h = states[:, k, -1]
    y = torch.einsum("bgtdn,bgtn->bgtd", states, C.view(b, g, T, n)).reshape(b, m, d)  # (b, m, d)
    return y, h.clone()  # h is a view of the buffer the next super-block overwrites


def mamba1_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                h0: Tensor | None, *, dt_bias: Tensor, delta_scale: Tensor | None, out_weight: Tensor,
                out_bias: Tensor | None, padding: Padding | None = None,
                block: int = SCAN_BLOCK) -> tuple[Tensor, Tensor]:
    """`contract.Ops.mamba1_scan` in blocks of `block` tokens. (The projection is part of the op so that
    kernels may fold a Δ scale into it.)"""
    b, l, d = x.shape
    n = A.shape[-1]
    delta = discretise(dt if padding is None else padding.silence(dt), dt_bias, delta_scale)  # (b, l, d)
    x, B, C = x.float(), B.float(), C.float()
    A = A.expand(b, d, n)  # (b, d, n)
    h = x.new_zeros(b, d, n) if h0 is None else h0.float()
    differentiable = records_autograd(delta, x, A, B, C, h)
    kernel_reads = x.device.type == "cpu" and delta.dtype == A.dtype == torch.float32  # float32 CPU tensors
    if not differentiable and kernel_reads and cpu_scan.kernel() is not None:
        y, h = cpu_scan.mamba1_scan(delta, x, A, B, C, h)  # (b, l, d), (b, d, n)
        return _mamba1_output(y, x, D, z, out_weight, out_bias), h
    if differentiable and kernel_reads and cpu_scan_grad.runs(delta, A):  # its backward kernel too
        y, h = cpu_scan_grad.mamba1_scan(delta, x, A, B, C, h)  # (b, l, d), (b, d, n)
        return _mamba1_output(y, x, D, z, out_weight, out_bias), h
    dx = delta * x  # (b, l, d)
    # Tokens per super-block: its (tokens, d, n) intermediates stay near SUPERBLOCK_ELEMENTS (cache-sized).
    span = block * max(1, SUPERBLOCK_ELEMENTS // (block * b * d * n))
    buffers = [] if differentiable else [x.new_empty(b * min(span, l + block) * d * n) for _ in range(2)]
    scanned = []
    for start in range(0, l, span):
        stop = min(start + span, l)
        # Pad to whole blocks with Δ = 0: exp(0·A) = 1 and no input, so the state passes through unchanged.
        pad = -(stop - start) % block
        parts = [t[:, start:stop] if pad == 0 else F.pad(t[:, start:stop], (0, 0, 0, pad)) for t in (dx, delta, B, C)]
        if differentiable:
            y, h = _mamba1_superblock(parts[0], parts[1], A, parts[2], parts[3], h, block)
        else:
            y, h = _mamba1_superblock_inplace(parts[0], parts[1], A, parts[2], parts[3], h, block, *buffers)
        scanned.append(y[:, : stop - start])
    return _mamba1_output(torch.cat(scanned, dim=1), x, D, z, out_weight, out_bias), h


def _mamba1_output(y: Tensor, x: Tensor, D: Tensor, z: Tensor | None, out_weight: Tensor,
                   out_bias: Tensor | None) -> Tensor:
    """The scan's y (b, l, d) float32 with the D skip, gated by SiLU(z), through the output projection."""
    y = y + x * D.float()  # (b, l, d)
    if z is not None:
        y = y * F.silu(z.float())
    return F.linear(y.to(out_weight.dtype), out_weight, out_bias)


def ssm_A(A_log: Tensor, a_scale: Tensor | None) -> Tensor:
    """A = −exp(A_log) float32, (d, n) for Mamba1 or (h,) for Mamba2, times an A-spectrum scale (b, d, n) /
    (b, h) when given: then per sequence."""
    A = -torch.exp(A_log.float())
    return A if a_scale is None else A * a_scale


def mamba1_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None, *,
                dt_bias: Tensor, A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba1_step`: h (b, d, n) float32 or a pool's rows; x, dt, z (b, d); B, C (b, n)."""
    delta = discretise(dt, dt_bias, delta_scale)  # (b, d)
    A = ssm_A(A_log, a_scale)  # (d, n) or (b, d, n)
    xf, B, C = x.float(), B.float(), C.float()

    def update(rows: Tensor) -> Tensor:
        rows.mul_(torch.exp(delta[..., None] * A)).add_((delta * xf)[..., None] * B[:, None, :])  # (b, d, n)
        return (rows @ C[..., None]).squeeze(-1)  # (b, d)
    y = on_float32_rows(h, slots, update) + xf * D.float()  # (b, d)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def mamba1_decode(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba1_decode`. On CPU in float32 the compiled kernel of cpu_decode runs where a C compiler
    is found; this composition of PyTorch operators is its fallback."""
    w = weights
    inputs = (w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_proj_weight, w.dt_bias, w.A_log, a_scale,
              delta_scale, w.D)
    if cpu_decode.runs((conv_state, h), inputs, rows=(x, z)):
        return cpu_decode.mamba1_decode(x, z, conv_state, h, weights, delta_scale=delta_scale, a_scale=a_scale,
                                        slots=slots)
    return composed_mamba1_decode(causal_conv1d_step, mamba1_step, x, z, conv_state, h, weights,
                                  delta_scale=delta_scale, a_scale=a_scale, slots=slots)


def mamba1_decode_int8(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                       delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Int8DecodeOps.mamba1_decode_int8` (quant.py's INT8 x_proj and dt_proj with their float32 row
    scales). On CPU in float32 the compiled kernel of cpu_decode reads the integers; else the weights are
    dequantised for the composed step."""
    w = weights
    inputs = (w.conv_weight, w.conv_bias, w.dt_bias, w.A_log, a_scale, delta_scale, w.D, w.x_proj_scale,
              w.dt_proj_scale)
    if cpu_decode.runs((conv_state, h), inputs, rows=(x, z), int8=(w.x_proj_weight, w.dt_proj_weight)):
        return cpu_decode.mamba1_decode_int8(x, z, conv_state, h, weights, delta_scale=delta_scale, a_scale=a_scale,
                                             slots=slots)
    return composed_mamba1_decode(causal_conv1d_step, mamba1_step, x, z, conv_state, h, weights.dequantised(x.dtype),
                                  delta_scale=delta_scale, a_scale=a_scale, slots=slots)


ConvStep = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]


def composed_mamba1_decode(conv_step: ConvStep, ssm_step: Callable[..., Tensor], x: Tensor, z: Tensor,
                           conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *, delta_scale: Tensor | None,
                           a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`mamba1_decode` as a back-end's `causal_conv1d_step` and `mamba1_step` around two matrix products."""
    w = weights
    x = conv_step(x, conv_state, w.conv_weight, w.conv_bias, slots)  # (b, d)
    rank, n = w.dt_proj_weight.shape[1], h.shape[-1]
    dt_low, B, C = torch.split(F.linear(x, w.x_proj_weight), [rank, n, n], dim=-1)  # (b, r), (b, n), (b, n)
    dt = F.linear(dt_low, w.dt_proj_weight)  # (b, d)
    return ssm_step(h, x, dt, B, C, w.D, z, dt_bias=w.dt_bias, A_log=w.A_log, delta_scale=delta_scale,
                    a_scale=a_scale, slots=slots)


def _per_head(t: Tensor, heads: int) -> Tensor:
    """(..., g, n) -> (..., h, n): each group's B or C repeated for the heads it serves."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def _ssd_block(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """x: (b, T, h, p); dt: (b, T, h); A: (b, h); B, C: (b, T, h, n); h: (b, h, p, n).
    Returns y (b, T, h, p) without the D skip, and h_T."""
    T = dt.shape[1]
    log_decay = (dt * A[:, None]).cumsum(1)  # (b, T, h), S_t ≤ 0
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) [t, s]
    pair = log_decay[:, :, None, :] - log_decay[:, None, :, :]  # (b, T, T, h): S_t - S_s
    decay = torch.exp(pair.masked_fill(~causal[..., None], -torch.inf))  # (b, T, T, h), 0 above diagonal
    xdt = x * dt[..., None]  # (b, T, h, p)
    scores = torch.einsum("bthn,bshn->btsh", C, B) * decay  # (b, T, T, h) [t, s]
    y = torch.einsum("btsh,bshp->bthp", scores, xdt)  # (b, T, h, p)
    y = y + torch.einsum("bthn,bhpn->bthp", C, h) * torch.exp(log_decay)[..., None]  # from the carried state
    to_end = torch.exp(log_decay[:, -1:] - log_decay)  # (b, T, h)
    h_new = h * torch.exp(log_decay[:, -1])[..., None, None] + torch.einsum(
        "bshn,bshp->bhpn", B, xdt * to_end[..., None]
    )  # (b, h, p, n)
    return y, h_new


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None, *,
                dt_bias: Tensor, dt_limit: tuple[float, float], delta_scale: Tensor | None,
                padding: Padding | None = None, block: int = SSD_BLOCK) -> tuple[Tensor, Tensor]:
    """`contract.Ops.mamba2_scan` in blocks of `block` tokens."""
    b, l, heads, p = x.shape
    n = B.shape[-1]
    delta = discretise(dt if padding is None else padding.silence(dt), dt_bias, delta_scale, dt_limit)  # (b, l, h)
    x = x.float()
    B, C = _per_head(B.float(), heads), _per_head(C.float(), heads)  # (b, l, h, n)
    A = A.expand(b, heads)  # (b, h)
    h = x.new_zeros(b, heads, p, n) if h0 is None else h0.float()
    ys = []
    for start in range(0, l, block):
        stop = min(start + block, l)
        y, h = _ssd_block(x[:, start:stop], delta[:, start:stop], A, B[:, start:stop], C[:, start:stop], h)
        ys.append(y)
    y = torch.cat(ys, dim=1) + x * D.float()[:, None]  # (b, l, h, p)
    return y, h


def mamba2_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, *, dt_bias: Tensor,
                dt_limit: tuple[float, float], A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba2_step`: h (b, h, p, n) float32 or a pool's rows; x (b, h, p); dt (b, h); B, C (b, g, n)."""
    heads = x.shape[1]
    delta = discretise(dt, dt_bias, delta_scale, dt_limit)  # (b, h)
    A = ssm_A(A_log, a_scale)  # (h,) or (b, h)
    x = x.float()
    B, C = _per_head(B.float(), heads), _per_head(C.float(), heads)  # (b, h, n)

    def update(rows: Tensor) -> Tensor:
        rows.mul_(torch.exp(delta * A)[..., None, None]).add_((x * delta[..., None])[..., None] * B[:, :, None, :])
        return (rows @ C[..., None]).squeeze(-1)  # (b, h, p)
    return on_float32_rows(h, slots, update) + x * D.float()[:, None]  # (b, h, p)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """`contract.Ops.gated_rms_norm`: y, z (..., d); weight (d,). Returns (..., d) in z's dtype."""
    v = y.float() * F.silu(z.float())
    grouped = v.unflatten(-1, (groups, -1))  # type: ignore[no-untyped-call]  # (..., g, d/g)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out: Tensor = (grouped.flatten(-2) * weight.float()).to(z.dtype)
    return out


def mamba2_decode(xBC: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba2Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    """`contract.Ops.mamba2_decode`, composed of this back-end's operators."""
    return composed_mamba2_decode(causal_conv1d_step, mamba2_step, gated_rms_norm, xBC, z, dt, conv_state, h, weights,
                                  delta_scale=delta_scale, a_scale=a_scale, slots=slots)


def composed_mamba2_decode(conv_step: ConvStep, ssm_step: Callable[..., Tensor], norm: Callable[..., Tensor],
                           xBC: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba2Weights,
                           *, delta_scale: Tensor | None, a_scale: Tensor | None,
                           slots: Tensor | None = None) -> Tensor:
    """`mamba2_decode` as a back-end's `causal_conv1d_step`, `mamba2_step` and `gated_rms_norm`."""
    w = weights
    b, heads, p, n = xBC.shape[0], *h.shape[1:]
    xBC = conv_step(xBC, conv_state, w.conv_weight, w.conv_bias, slots)  # (b, c)
    x, B, C = torch.split(xBC, [heads * p, w.ngroups * n, w.ngroups * n], dim=-1)
    y = ssm_step(h, x.view(b, heads, p), dt, B.view(b, w.ngroups, n), C.view(b, w.ngroups, n), w.D,
                 dt_bias=w.dt_bias, dt_limit=w.dt_limit, A_log=w.A_log, delta_scale=delta_scale, a_scale=a_scale,
                 slots=slots)  # (b, h, p)
    return norm(y.flatten(1), z, w.norm_weight, w.ngroups, w.norm_eps)  # (b, d)


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's residual connection and the next RMSNorm: residual (b, D) + update (b, D) (or residual
    alone when update is None), in the residual's dtype, and its norm (float32 maths, weight (D,)) in `dtype`.
    On CPU in float32 one compiled kernel of cpu_decode where a C compiler is found, these operators otherwise."""
    if dtype == torch.float32 and cpu_decode.runs((), (residual, update, weight)):
        return cpu_decode.add_rms_norm(residual, update, weight, eps, dtype)
    if update is not None:
        residual = residual + update
    return residual, F.rms_norm(residual.float(), residual.shape[-1:], weight.float(), eps).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's dense projection (out_proj): x (b, D) · weight (N, D)ᵀ + bias. Returns (b, N)."""
    return F.linear(x, weight, bias)


def add_rms_norm_linear(residual: torch.Tensor, update: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` into the next block's input projection: returns the residual (b, D) and
    norm(residual) Wᵀ + bias (b, N) for weight (N, D), the norm rounded to weight's dtype first."""
    residual, normed = add_rms_norm(residual, update, norm_weight, eps, weight.dtype)
    return residual, F.linear(normed, weight, bias)
