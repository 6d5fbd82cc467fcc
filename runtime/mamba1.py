"""Mamba1 mixer (Gu & Dao, 2023): the selective SSM block, parameter names as in mamba_ssm and transformers.

Shapes: b batch, l sequence, D d_model, d d_inner, n d_state, r dt_rank, k d_conv.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import Backend
from .config import ModelConfig
from .ops.torch_ops import discretise, mamba1_A
from .quant import QuantizedWeight, linear
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

    def _project(self, x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias) for x (b, l, in) -> (b, l, out), `layer` an nn.Linear or a quantised one. With a
        channels-first back-end the result is a (b, l, out) view of (b, out, l) storage, the layout its scan
        reads without copying."""
        if not self.backend.channels_first or x.dim() != 3:
            return linear(x, layer, bias)
        out = torch.matmul(layer.weight, x.transpose(1, 2))  # (b, out, l)
        return (out if bias is None else out + bias[:, None]).transpose(1, 2)

    def _ssm_inputs(self, x: torch.Tensor):
        """x: (..., d) after the conv. Returns dt (..., d) before bias and softplus, B and C (..., n)."""
        r, n = self.config.dt_rank, self.config.d_state
        dt_low, B, C = self._project(x, self.x_proj).split([r, n, n], dim=-1)  # (..., r), (..., n), (..., n)
        return self._project(dt_low, self.dt_proj), B, C  # (..., d), (..., n), (..., n)

    def forward(self, hidden: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None,
                return_delta: bool = False):
        """Prefill. hidden: (b, l, D); conv_state (b, d, k-1) and ssm_state (b, d, n) or None for zeros.
        Returns out (b, l, D) and the new (conv_state, ssm_state); with `return_delta` also Δ (b, l, d)
        float32 as the scan discretises it (what a decimating layer ranks positions by)."""
        ops = self.backend.ops
        x, z = self._project(hidden, self.in_proj, self.in_proj.bias).chunk(2, dim=-1)  # (b, l, d) each
        one_set = scales is not None and (x.shape[0] == 1 or scales.shared)  # every sequence scaled alike
        a_scale = None if scales is None or scales.a is None else scales.a[0] if one_set else scales.a
        A = mamba1_A(self.A_log, a_scale)  # (d, n), or (b, d, n) for sets that differ
        delta_scale = None if scales is None else scales.delta  # (b, d): the scan discretises Δ itself
        conv_weight, conv_bias = self.conv1d.weight[:, 0], self.conv1d.bias  # (d, k), (d,)
        if delta_scale is not None and one_set:
            # One set: Δ' = s·Δ is exactly A' = s·A with input x' = s·x and skip D' = D/s (the state stays
            # h), so the scan runs unscaled, the kernels' fastest path; x' comes out of the convolution.
            x, scan_x, conv_state = ops.causal_conv1d_scaled(x, conv_weight, conv_bias, conv_state, delta_scale)
            (scan_A, scan_D), scan_scale = scales.folded(A, self.D), None
        else:
            x, conv_state = ops.causal_conv1d(x, conv_weight, conv_bias, conv_state)  # (b, l, d)
            scan_x, scan_A, scan_D, scan_scale = x, A, self.D, delta_scale
        dt, B, C = self._ssm_inputs(x)
        out, ssm_state = ops.mamba1_scan(scan_x, dt, self.dt_proj.bias, scan_scale, scan_A, B, C, scan_D, z, ssm_state,
                                         self.out_proj.weight, self.out_proj.bias)  # (b, l, D), (b, d, n)
        if return_delta:  # the scan kernels discretise Δ internally and do not return it: recomputed here
            return out, (conv_state, ssm_state), discretise(dt, self.dt_proj.bias, delta_scale)  # (b, l, d)
        return out, (conv_state, ssm_state)

    def step(self, projected: torch.Tensor, conv_state, ssm_state, scales: LayerScales | None,
             slots: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one token. projected: (b, in_proj rows), in_proj of the block's normed input (the model runs
        the two together); the states (b, ...), or with `slots` (b,) a pool's (whose row slots[i] is
        sequence i's), are updated in place. Returns (b, D)."""
        ops = self.backend.ops
        x, z = projected.chunk(2, dim=-1)  # (b, d) each
        conv_weight = self.conv1d.weight[:, 0]  # (d, k)
        delta_scale, a_scale = (None, None) if scales is None else (scales.delta, scales.a)  # (b, d), (b, d, n)
        quantised = isinstance(self.x_proj, QuantizedWeight) or isinstance(self.dt_proj, QuantizedWeight)
        int8 = quantised and all(isinstance(p, QuantizedWeight) and p.bits == 8 for p in (self.x_proj, self.dt_proj))
        if int8 and hasattr(ops, "mamba1_decode_int8"):  # a back-end whose decode step reads INT8 projections
            y = ops.mamba1_decode_int8(x, z, conv_state, conv_weight, self.conv1d.bias, self.x_proj.qweight,
                                       self.x_proj.scale, self.dt_proj.qweight, self.dt_proj.scale, self.dt_proj.bias,
                                       ssm_state, self.A_log, a_scale, delta_scale, self.D, slots)  # (b, d)
        elif quantised:
            # quantised projections go through their own kernels, so the step is composed of separate calls
            x = ops.causal_conv1d_step(x, conv_state, conv_weight, self.conv1d.bias, slots)  # (b, d)
            dt, B, C = self._ssm_inputs(x)
            y = ops.mamba1_step(ssm_state, x, dt, self.dt_proj.bias, delta_scale, self.A_log, a_scale, B, C, self.D,
                                z, slots)  # (b, d)
        else:
            y = ops.mamba1_decode(x, z, conv_state, conv_weight, self.conv1d.bias, self.x_proj.weight,
                                  self.dt_proj.weight, self.dt_proj.bias, ssm_state, self.A_log, a_scale, delta_scale,
                                  self.D, slots)  # (b, d)
        return linear(y.to(projected.dtype), self.out_proj, self.out_proj.bias, ops)
