"""Mamba2 mixer (Dao & Gu, 2024): the SSD block with a gated RMSNorm, names as in mamba_ssm and transformers.

Shapes: b batch, l sequence, D d_model, d d_inner, h nheads, p headdim, g ngroups, n d_state, k d_conv.
The in_proj output is laid out [z (d), x (d), B (g·n), C (g·n), dt (h)]; the conv runs over [x, B, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import Backend
from .config import ModelConfig
from .quant import linear
from .scales import LayerScales


class GatedRMSNorm(nn.Module):
    """RMSNorm of y·SiLU(z) over groups of d/g channels (mamba_ssm's norm_before_gate=False)."""

    def __init__(self, d: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y: (..., d) float32, z: (..., d). Returns (..., d) float32."""
        y = y * F.silu(z.float())
        grouped = y.unflatten(-1, (self.groups, -1))  # (..., g, d/g)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return grouped.flatten(-2) * self.weight.float()


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        c = config
        self.config = c
        self.backend = backend
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, bias=c.proj_bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.nheads))
        self.A_log = nn.Parameter(torch.zeros(c.nheads))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, c.ngroups, c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.proj_bias)

    def _split(self, projected: torch.Tensor):
        c = self.config
        return projected.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)  # z, xBC, dt

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor, scales: LayerScales | None):
        """xBC: (..., conv_dim) after the conv; dt: (..., h). Returns x (..., h, p), Δ (..., h) float32
        scaled, A, B and C (..., g, n)."""
        c = self.config
        x, B, C = xBC.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        x = x.unflatten(-1, (c.nheads, c.headdim))  # (..., h, p)
        B = B.unflatten(-1, (c.ngroups, c.d_state))  # (..., g, n)
        C = C.unflatten(-1, (c.ngroups, c.d_state))
        delta = F.softplus(dt.float() + self.dt_bias.float()).clamp(*c.dt_limit)  # (..., h)
        A = -torch.exp(self.A_log.float())  # (h,)
        if scales is not None and scales.delta is not None:
            # scales.delta: (b, h); Δ is (b, l, h) in prefill and (b, h) in decode
            delta = delta * (scales.delta if delta.dim() == 2 else scales.delta[:, None, :])
        if scales is not None and scales.a is not None:
            A = A * scales.a  # (b, h)
        return x, delta, A, B, C

    def forward(self, hidden: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None,
                return_delta: bool = False):
        """Prefill. hidden: (b, l, D). Returns out (b, l, D) and the new (conv_state, ssm_state); with
        `return_delta` also the scan's Δ (b, l, h) float32 (what a decimating layer ranks positions by)."""
        ops = self.backend.ops
        z, xBC, dt = self._split(self.in_proj(hidden))  # (b, l, d), (b, l, conv_dim), (b, l, h)
        xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        x, delta, A, B, C = self._ssm_inputs(xBC, dt, scales)
        y, ssm_state = ops.mamba2_scan(x, delta, A, B, C, self.D, ssm_state)  # (b, l, h, p), (b, h, p, n)
        y = self.norm(y.flatten(-2).float(), z)  # (b, l, d)
        out = self.out_proj(y.to(hidden.dtype))  # (b, l, D)
        return (out, (conv_state, ssm_state), delta) if return_delta else (out, (conv_state, ssm_state))

    def step(self, projected: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None,
             slots: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one token. projected: (b, in_proj rows), in_proj of the block's normed input (the model runs
        the two together); the states (b, ...), or with `slots` (b,) a pool's (whose row slots[i] is
        sequence i's), are updated in place. Returns (b, D)."""
        ops = self.backend.ops
        z, xBC, dt = self._split(projected)  # (b, d), (b, conv_dim), (b, h)
        xBC = ops.causal_conv1d_step(xBC, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, slots)
        x, delta, A, B, C = self._ssm_inputs(xBC, dt, scales)
        y = ops.mamba2_step(ssm_state, x, delta, A, B, C, self.D, slots)  # (b, h, p)
        y = self.norm(y.flatten(-2).float(), z)  # (b, d)
        return linear(y.to(projected.dtype), self.out_proj, self.out_proj.bias, ops)
