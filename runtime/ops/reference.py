"""The reference back-end: every operator of `contract.Ops` exactly as the papers write it, one token at a time,
in float64, with the same signatures as the fast back-ends. Slow by design; tests hold the others to it.

Shapes as in `contract`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..padding import Padding
from .contract import Mamba1Weights, Mamba2Weights

Tensor = torch.Tensor


def _rows(state: Tensor, slots: Tensor | None) -> Tensor:
    """The rows of a state (or of a pool, at `slots`) a step reads, as a float64 copy."""
    return (state if slots is None else state[slots]).double()


def _write_rows(state: Tensor, slots: Tensor | None, rows: Tensor) -> None:
    if slots is None:
        state.copy_(rows)
    else:
        state[slots] = rows.to(state.dtype)


def _delta(dt: Tensor, dt_bias: Tensor, delta_scale: Tensor | None, limit: tuple[float, float] | None) -> Tensor:
    """Δ = softplus(dt + dt_bias), clamped to `limit`, times the per-sequence scale (b, c): float64."""
    delta = F.softplus(dt.double() + dt_bias.double())
    if limit is not None:
        delta = delta.clamp(*limit)
    if delta_scale is None:
        return delta
    return delta * (delta_scale.double() if delta.dim() == 2 else delta_scale.double()[:, None, :])


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                  padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    b, l, c = x.shape
    k = weight.shape[-1]
    past = torch.zeros(b, c, k - 1, dtype=torch.float64, device=x.device) if state is None else state.double()
    window = torch.cat((past, x.transpose(1, 2).double()), dim=-1)  # (b, c, k-1+l)
    y = torch.stack([(window[..., t:t + k] * weight.double()).sum(-1) for t in range(l)], dim=1)  # (b, l, c)
    if bias is not None:
        y = y + bias.double()
    new_state = window[..., l:] if padding is None else padding.conv_state(x.double(), past)
    return F.silu(y).to(x.dtype), new_state.to(x.dtype)


def causal_conv1d_scaled(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                         scale: Tensor, padding: Padding | None = None) -> tuple[Tensor, Tensor, Tensor]:
    y, new_state = causal_conv1d(x, weight, bias, state, padding)
    return y, scale_channels(y, scale), new_state


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None,
                       slots: Tensor | None = None) -> Tensor:
    window = torch.cat((_rows(state, slots), x[..., None].double()), dim=-1)  # (b, c, k)
    y = (window * weight.double()).sum(-1)
    if bias is not None:
        y = y + bias.double()
    _write_rows(state, slots, window[..., 1:].to(state.dtype))
    return F.silu(y).to(torch.result_type(state, weight))


def scale_channels(x: Tensor, scale: Tensor) -> Tensor:
    return x * scale[:, None, :].to(x.dtype)


def _mamba1_recurrence(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                       h: Tensor) -> tuple[Tensor, Tensor]:
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t; y_t = C_t h_t + D x_t, gated by SiLU(z_t). Float64 throughout:
    x, delta, z (b, l, d); A (d, n) or (b, d, n); B, C (b, l, n); h (b, d, n). Returns y (b, l, d) and h."""
    x, B, C, A = x.double(), B.double(), C.double(), A.double()
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D.double() * x[:, t])
    y = torch.stack(ys, dim=1)
    return (y if z is None else y * F.silu(z.double())), h


def mamba1_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                h0: Tensor | None, *, dt_bias: Tensor, delta_scale: Tensor | None, out_weight: Tensor,
                out_bias: Tensor | None, padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    b, _, d = x.shape
    h = torch.zeros(b, d, A.shape[-1], dtype=torch.float64, device=x.device) if h0 is None else h0.double()
    dt = dt if padding is None else padding.silence(dt)
    y, h = _mamba1_recurrence(x, _delta(dt, dt_bias, delta_scale, None), A, B, C, D, z, h)
    return F.linear(y.to(out_weight.dtype), out_weight, out_bias), h.float()


def mamba1_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None, *,
                dt_bias: Tensor, A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    A = -torch.exp(A_log.double()) * (1 if a_scale is None else a_scale.double())
    # a scan of one token: (b, ·) -> (b, 1, ·)
    y, rows = _mamba1_recurrence(x[:, None], _delta(dt, dt_bias, delta_scale, None)[:, None], A, B[:, None],
                                 C[:, None], D, None if z is None else z[:, None], _rows(h, slots))
    _write_rows(h, slots, rows)
    return y[:, 0].to(x.dtype)


def mamba1_decode(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    w = weights
    x = causal_conv1d_step(x, conv_state, w.conv_weight, w.conv_bias, slots)  # (b, d)
    rank, n = w.dt_proj_weight.shape[1], h.shape[-1]
    dt_low, B, C = torch.split(linear(x, w.x_proj_weight), [rank, n, n], dim=-1)  # (b, r), (b, n), (b, n)
    return mamba1_step(h, x, linear(dt_low, w.dt_proj_weight), B, C, w.D, z, dt_bias=w.dt_bias, A_log=w.A_log,
                       delta_scale=delta_scale, a_scale=a_scale, slots=slots)


def mamba1_decode_int8(x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                       delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    return mamba1_decode(x, z, conv_state, h, weights.dequantised(x.dtype), delta_scale=delta_scale,
                         a_scale=a_scale, slots=slots)


def _mamba2_recurrence(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                       h: Tensor) -> tuple[Tensor, Tensor]:
    """Per head: h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t ⊗ B_t; y_t = h_t C_t + D x_t. Float64: x (b, l, h, p);
    delta (b, l, h); A (h,) or (b, h); B, C (b, l, g, n); h (b, h, p, n). Returns y (b, l, h, p) and h."""
    b, l, heads, _ = x.shape
    group_of_head = torch.arange(heads) // (heads // B.shape[-2])
    A = A.double().expand(b, heads)
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t, group_of_head].double(), C[:, t, group_of_head].double()  # (b, h, n)
        xt, dt = x[:, t].double(), delta[:, t]  # (b, h, p), (b, h)
        h = torch.exp(dt * A)[..., None, None] * h + (dt[..., None] * xt)[..., None] * Bt[:, :, None]
        ys.append((h * Ct[:, :, None]).sum(-1) + D.double()[:, None] * xt)
    return torch.stack(ys, dim=1), h


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None, *,
                dt_bias: Tensor, dt_limit: tuple[float, float], delta_scale: Tensor | None,
                padding: Padding | None = None) -> tuple[Tensor, Tensor]:
    b, _, heads, p = x.shape
    h = torch.zeros(b, heads, p, B.shape[-1], dtype=torch.float64, device=x.device) if h0 is None else h0.double()
    dt = dt if padding is None else padding.silence(dt)
    y, h = _mamba2_recurrence(x, _delta(dt, dt_bias, delta_scale, dt_limit), A, B, C, D, h)
    return y.float(), h.float()


def mamba2_step(h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, *, dt_bias: Tensor,
                dt_limit: tuple[float, float], A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                slots: Tensor | None = None) -> Tensor:
    A = -torch.exp(A_log.double()) * (1 if a_scale is None else a_scale.double())
    y, rows = _mamba2_recurrence(x[:, None], _delta(dt, dt_bias, delta_scale, dt_limit)[:, None], A, B[:, None],
                                 C[:, None], D, _rows(h, slots))
    _write_rows(h, slots, rows)
    return y[:, 0].float()


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    v = (y.double() * F.silu(z.double())).unflatten(-1, (groups, -1))  # type: ignore[no-untyped-call]
    normed = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)  # (..., g, d/g)
    out: Tensor = (normed.flatten(-2) * weight.double()).to(z.dtype)
    return out


def mamba2_decode(xBC: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba2Weights, *,
                  delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
    w = weights
    b, heads, p, n = xBC.shape[0], *h.shape[1:]
    xBC = causal_conv1d_step(xBC, conv_state, w.conv_weight, w.conv_bias, slots)  # (b, c)
    x, B, C = torch.split(xBC, [heads * p, w.ngroups * n, w.ngroups * n], dim=-1)
    y = mamba2_step(h, x.reshape(b, heads, p), dt, B.reshape(b, w.ngroups, n), C.reshape(b, w.ngroups, n), w.D,
                    dt_bias=w.dt_bias, dt_limit=w.dt_limit, A_log=w.A_log, delta_scale=delta_scale,
                    a_scale=a_scale, slots=slots)  # (b, h, p)
    return gated_rms_norm(y.flatten(1), z, w.norm_weight, w.ngroups, w.norm_eps)


def add_rms_norm(residual: Tensor, update: Tensor | None, weight: Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if update is not None:
        residual = residual + update
    r = residual.double()
    normed = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps) * weight.double()
    return residual, normed.to(dtype)


def add_rms_norm_linear(residual: Tensor, update: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    residual, normed = add_rms_norm(residual, update, norm_weight, eps, weight.dtype)
    return residual, linear(normed, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).to(torch.result_type(x, weight))
