"""Mamba2 mixer (Dao & Gu, 2024): the SSD block with a gated RMSNorm, names as in mamba_ssm and transformers.

Shapes: b batch, l sequence, D d_model, d d_inner, h nheads, p headdim, g ngroups, n d_state, k d_conv.
The in_proj output is laid out [z (d), x (d), B (g·n), C (g·n), dt (h)]; the conv runs over [x, B, C].
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import Backend
from .config import ModelConfig
from .ops.contract import Mamba2Weights
from .ops.torch_ops import discretise, ssm_A
from .padding import Padding
from .quant import Projection, linear
from .scales import LayerScales
from .state import MixerOutput

Tensor = torch.Tensor


class GatedRMSNorm(nn.Module):
    """The weight and settings of the RMSNorm of y·SiLU(z) over groups of d/g channels (mamba_ssm's
    norm_before_gate=False); the back-end's `gated_rms_norm` applies it."""

    def __init__(self, d: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.groups = groups
        self.eps = eps


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        c = config
        self.config = c
        self.backend = backend
        self.in_proj: Projection = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads,
                                            bias=c.proj_bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.nheads))
        self.A_log = nn.Parameter(torch.zeros(c.nheads))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, c.ngroups, c.norm_eps)
        self.out_proj: Projection = nn.Linear(c.d_inner, c.d_model, bias=c.proj_bias)

    def _split(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        z, xBC, dt = torch.split(projected, [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        return z, xBC, dt

    def _ssm_inputs(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xBC: (..., conv_dim) after the conv. Returns x (..., h, p), B and C (..., g, n)."""
        c = self.config
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        return (x.unflatten(-1, (c.nheads, c.headdim)),  # type: ignore[no-untyped-call]  # (..., h, p)
                B.unflatten(-1, (c.ngroups, c.d_state)),  # type: ignore[no-untyped-call]  # (..., g, n)
                C.unflatten(-1, (c.ngroups, c.d_state)))  # type: ignore[no-untyped-call]

    def forward(self, hidden: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None,
                scales: LayerScales | None, return_delta: bool = False, padding: Padding | None = None) -> MixerOutput:
        """Prefill. hidden: (b, l, D). Returns out (b, l, D) and the new (conv_state, ssm_state); with
        `return_delta` also the scan's Δ (b, l, h) float32 (what a decimating layer ranks positions by); with
        `padding` (where `pads_exactly`), rows padded on the right, each new state is its row's after its last
        real token."""
        c, ops = self.config, self.backend.ops
        delta_scale, a_scale = (None, None) if scales is None else (scales.delta, scales.a)  # (b, h) each
        z, xBC, dt = self._split(self.in_proj(hidden))  # (b, l, d), (b, l, conv_dim), (b, l, h)
        xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, padding)
        x, B, C = self._ssm_inputs(xBC)
        y, ssm_state = ops.mamba2_scan(x, dt, ssm_A(self.A_log, a_scale), B, C, self.D, ssm_state,
                                       dt_bias=self.dt_bias, dt_limit=c.dt_limit, delta_scale=delta_scale,
                                       padding=padding)  # (b, l, h, p), (b, h, p, n)
        # one pass from the scan's output to out_proj's input, in the model's dtype (z's)
        y = ops.gated_rms_norm(y.flatten(-2), z, self.norm.weight, self.norm.groups, self.norm.eps)  # (b, l, d)
        out: Tensor = self.out_proj(y)  # (b, l, D)
        delta = discretise(dt, self.dt_bias, delta_scale, c.dt_limit) if return_delta else None  # (b, l, h)
        return MixerOutput(out, (conv_state, ssm_state), delta)

    def step(self, projected: Tensor, conv_state: Tensor, ssm_state: Tensor, scales: LayerScales | None,
             slots: Tensor | None = None) -> Tensor:
        """Decode one token. projected: (b, in_proj rows), in_proj of the block's normed input (the model runs
        the two together); the states (b, ...), or with `slots` (b,) a pool's (whose row slots[i] is
        sequence i's), are updated in place. Returns (b, D)."""
        ops = self.backend.ops
        delta_scale, a_scale = (None, None) if scales is None else (scales.delta, scales.a)  # (b, h) each
        z, xBC, dt = self._split(projected)  # (b, d), (b, conv_dim), (b, h)
        c = self.config
        weights = Mamba2Weights(self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                                self.norm.weight, self.norm.eps, c.ngroups, c.dt_limit)
        y = ops.mamba2_decode(xBC, z, dt, conv_state, ssm_state, weights, delta_scale=delta_scale, a_scale=a_scale,
                              slots=slots)  # (b, d)
        return linear(y, self.out_proj, self.out_proj.bias, ops)
