"""Mamba1 mixer (Gu & Dao, 2023): the selective SSM block, parameter names as in mamba_ssm and transformers.

Shapes: b batch, l sequence, D d_model, d d_inner, n d_state, r dt_rank, k d_conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import Backend
from .config import ModelConfig
from .scales import LayerScales


class Mamba1Mixer(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        d, n, r = config.d_inner, config.d_state, config.dt_rank
        self.config = config
        self.backend = backend
        self.in_proj = nn.Linear(config.d_model, 2 * d, bias=config.proj_bias)  # -> x, z
        self.conv1d = nn.Conv1d(d, d, config.d_conv, groups=d, bias=config.conv_bias)  # weight (d, 1, k)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)  # -> Δ (rank r), B, C
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, config.d_model, bias=config.proj_bias)

    def _ssm_inputs(self, x: torch.Tensor, scales: LayerScales | None):
        """x: (..., d) after the conv. Returns Δ (..., d) float32 scaled, A, B, C (..., n)."""
        r, n = self.config.dt_rank, self.config.d_state
        dt_low, B, C = self.x_proj(x).split([r, n, n], dim=-1)  # (..., r), (..., n), (..., n)
        delta = F.softplus(F.linear(dt_low, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # (..., d)
        A = -torch.exp(self.A_log.float())  # (d, n)
        if scales is not None and scales.delta is not None:
            # scales.delta: (b, d); Δ is (b, l, d) in prefill and (b, d) in decode
            delta = delta * (scales.delta if delta.dim() == 2 else scales.delta[:, None, :])
        if scales is not None and scales.a is not None:
            A = A * scales.a  # (b, d, n)
        return delta, A, B, C

    def forward(self, hidden: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None):
        """Prefill. hidden: (b, l, D); conv_state (b, d, k-1) and ssm_state (b, d, n) or None for zeros.
        Returns out (b, l, D) and the new (conv_state, ssm_state)."""
        ops = self.backend.ops
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d) each
        x, conv_state = ops.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)  # (b, l, d)
        delta, A, B, C = self._ssm_inputs(x, scales)
        y, ssm_state = ops.mamba1_scan(x, delta, A, B, C, self.D, z, ssm_state)  # (b, l, d), (b, d, n)
        return self.out_proj(y.to(hidden.dtype)), (conv_state, ssm_state)

    def step(self, hidden: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None) -> torch.Tensor:
        """Decode one token. hidden: (b, D); states updated in place. Returns (b, D)."""
        ops = self.backend.ops
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d) each
        x = ops.causal_conv1d_step(x, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias)  # (b, d)
        delta, A, B, C = self._ssm_inputs(x, scales)
        y = ops.mamba1_step(ssm_state, x, delta, A, B, C, self.D, z)  # (b, d)
        return self.out_proj(y.to(hidden.dtype))
