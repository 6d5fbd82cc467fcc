"""Pure-PyTorch operators: exact, vectorised over blocks of time, differentiable, any device.

Shape letters: b batch, l sequence, T block length, d d_inner (Mamba1 channels), c conv channels,
k conv width, n d_state, h heads, p head dim, g groups (Mamba2 B/C groups), r = h / g heads per group.

Mamba1 scan. Within a block starting from state h0, with S_t = Σ_{s≤t} Δ_s A (the log-decay from the
block start, ≤ 0), the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t has the closed form
    h_t = exp(S_t) · (h0 + Σ_{s≤t} exp(-S_s) Δ_s B_s x_s),
two cumulative sums instead of a loop over time. It is exact and its rounding error stays relative to
the recent terms as long as exp(-S) does not overflow, so a block whose decay exceeds DECAY_LIMIT is
split in halves until it does not (down to single steps, which are computed directly).

Mamba2 scan (SSD). A is a scalar per head, so within a block the decays exp(S_t - S_s), t ≥ s, form a
(T, T) matrix per head and the block is two matrix products plus the carried state (Dao & Gu, 2024).
Every exponent is ≤ 0: no overflow for any block length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCAN_BLOCK = 64  # Mamba1 block: (b, T, d, n) intermediates stay cache-sized
SSD_BLOCK = 64  # Mamba2 block: the per-head (T, T) decay matrix costs T per token
DECAY_LIMIT = 60.0  # largest exponent of exp(-S) within a Mamba1 block (float32 max is e^88)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None):
    """Depth-wise causal convolution then SiLU.

    x: (b, c, l); weight: (c, k); bias: (c,); state: (b, c, k-1), the inputs before x, or None for zeros.
    Returns y (b, c, l) and the new state (b, c, k-1).
    """
    b, c, _ = x.shape
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, c, k - 1)
    padded = torch.cat((state.to(x.dtype), x), dim=-1)  # (b, c, k-1+l)
    y = F.conv1d(padded, weight[:, None, :], bias, groups=c)  # (b, c, l)
    return F.silu(y), padded[..., padded.shape[-1] - (k - 1):].clone()


def causal_conv1d_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """One token of `causal_conv1d`. x: (b, c); state: (b, c, k-1), updated in place. Returns (b, c)."""
    window = torch.cat((state, x[..., None].to(state.dtype)), dim=-1)  # (b, c, k)
    y = (window * weight).sum(-1)  # (b, c)
    if bias is not None:
        y = y + bias
    state.copy_(window[..., 1:])
    return F.silu(y)


def _mamba1_block(dx, delta, A, B, C, h):
    """dx = Δ·x, delta: (b, T, d); A: (b, d, n); B, C: (b, T, n); h: (b, d, n). Returns y (b, T, d), h_T."""
    log_decay = (delta[..., None] * A[:, None]).cumsum(1)  # (b, T, d, n), S_t ≤ 0
    T = delta.shape[1]
    if T == 1:
        hs = torch.exp(log_decay) * h[:, None] + dx[..., None] * B[:, :, None, :]  # (b, 1, d, n)
    elif log_decay[:, -1].min() < -DECAY_LIMIT:
        half = T // 2
        y1, h = _mamba1_block(dx[:, :half], delta[:, :half], A, B[:, :half], C[:, :half], h)
        y2, h = _mamba1_block(dx[:, half:], delta[:, half:], A, B[:, half:], C[:, half:], h)
        return torch.cat((y1, y2), dim=1), h
    else:
        decay = torch.exp(log_decay)  # (b, T, d, n), in [e^-DECAY_LIMIT, 1]
        inputs = dx[..., None] * B[:, :, None, :]  # (b, T, d, n): Δ_s B_s x_s
        hs = ((inputs / decay).cumsum(1) + h[:, None]) * decay  # (b, T, d, n)
    y = (hs @ C[..., None]).squeeze(-1)  # (b, T, d)
    return y, hs[:, -1]


def mamba1_scan(x, delta, A, B, C, D, z, h0, block: int = SCAN_BLOCK):
    """Selective scan of a Mamba1 layer.

    x, delta, z: (b, l, d); A: (d, n) or (b, d, n); B, C: (b, l, n); D: (d,); h0: (b, d, n) or None.
    Returns y (b, l, d) float32 (D skip and SiLU(z) gate applied) and the last state (b, d, n) float32.
    """
    b, l, d = x.shape
    n = A.shape[-1]
    x, B, C = x.float(), B.float(), C.float()
    A = A.expand(b, d, n)  # (b, d, n)
    h = x.new_zeros(b, d, n) if h0 is None else h0.float()
    dx = delta * x  # (b, l, d)
    ys = []
    for start in range(0, l, block):
        stop = min(start + block, l)
        y, h = _mamba1_block(dx[:, start:stop], delta[:, start:stop], A, B[:, start:stop], C[:, start:stop], h)
        ys.append(y)
    y = torch.cat(ys, dim=1) + x * D.float()  # (b, l, d)
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def mamba1_step(h, x, delta, A, B, C, D, z):
    """One token. h: (b, d, n) float32, updated in place; x, delta, z: (b, d); A: (d, n) or (b, d, n);
    B, C: (b, n). Returns y (b, d) float32."""
    x, B, C = x.float(), B.float(), C.float()
    h.mul_(torch.exp(delta[..., None] * A)).add_((delta * x)[..., None] * B[:, None, :])  # (b, d, n)
    y = (h @ C[..., None]).squeeze(-1) + x * D.float()  # (b, d)
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): each group's B or C repeated for the heads it serves."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def _ssd_block(x, dt, A, B, C, h):
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


def mamba2_scan(x, dt, A, B, C, D, h0, block: int = SSD_BLOCK):
    """SSD scan of a Mamba2 layer.

    x: (b, l, h, p); dt: (b, l, h); A: (h,) or (b, h); B, C: (b, l, g, n); D: (h,); h0: (b, h, p, n) or None.
    Returns y (b, l, h, p) float32 with the D skip, and the last state (b, h, p, n) float32.
    """
    b, l, heads, p = x.shape
    n = B.shape[-1]
    x = x.float()
    B, C = _per_head(B.float(), heads), _per_head(C.float(), heads)  # (b, l, h, n)
    A = A.expand(b, heads)  # (b, h)
    h = x.new_zeros(b, heads, p, n) if h0 is None else h0.float()
    ys = []
    for start in range(0, l, block):
        stop = min(start + block, l)
        y, h = _ssd_block(x[:, start:stop], dt[:, start:stop], A, B[:, start:stop], C[:, start:stop], h)
        ys.append(y)
    y = torch.cat(ys, dim=1) + x * D.float()[:, None]  # (b, l, h, p)
    return y, h


def mamba2_step(h, x, dt, A, B, C, D):
    """One token. h: (b, h, p, n) float32, updated in place; x: (b, h, p); dt: (b, h); A: (h,) or (b, h);
    B, C: (b, g, n). Returns y (b, h, p) float32 with the D skip."""
    heads = x.shape[1]
    x = x.float()
    B, C = _per_head(B.float(), heads), _per_head(C.float(), heads)  # (b, h, n)
    h.mul_(torch.exp(dt * A)[..., None, None]).add_((x * dt[..., None])[..., None] * B[:, :, None, :])
    return (h @ C[..., None]).squeeze(-1) + x * D.float()[:, None]  # (b, h, p)
