"""Sequential references: the recurrences exactly as written in the papers, one token at a time.

Slow by design; tests compare every fast path against these. Same signatures and shapes as
`torch_ops.mamba1_scan` and `torch_ops.mamba2_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mamba1_scan_ref(x, delta, A, B, C, D, z, h0):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t; y_t = C_t h_t + D x_t, gated by SiLU(z_t)."""
    b, l, d = x.shape
    n = A.shape[-1]
    A = A.expand(b, d, n).double()
    h = torch.zeros(b, d, n, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None].double() * A) * h + (
            delta[:, t, :, None].double() * B[:, t, None, :].double() * x[:, t, :, None].double()
        )
        ys.append((h * C[:, t, None, :].double()).sum(-1) + D.double() * x[:, t].double())
    y = torch.stack(ys, dim=1)
    if z is not None:
        y = y * F.silu(z.double())
    return y.float(), h.float()


def mamba2_scan_ref(x, dt, A, B, C, D, h0):
    """Per head: h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t ⊗ B_t; y_t = h_t C_t + D x_t."""
    b, l, heads, p = x.shape
    groups, n = B.shape[-2:]
    group_of_head = torch.arange(heads) // (heads // groups)
    A = A.expand(b, heads).double()
    h = torch.zeros(b, heads, p, n, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(l):
        Bt = B[:, t, group_of_head].double()  # (b, h, n)
        Ct = C[:, t, group_of_head].double()
        dt_t = dt[:, t].double()  # (b, h)
        h = torch.exp(dt_t * A)[..., None, None] * h + (dt_t[..., None] * x[:, t].double())[..., None] * Bt[:, :, None]
        ys.append((h * Ct[:, :, None]).sum(-1) + D.double()[:, None] * x[:, t].double())
    return torch.stack(ys, dim=1).float(), h.float()
