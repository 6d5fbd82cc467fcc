"""Mamba1 mixer (Gu & Dao, 2023): the selective SSM block, parameter names as in mamba_ssm and transformers.

Shapes: b batch, l sequence, D d_model, d d_inner, n d_state, r dt_rank, k d_conv.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import Backend
from .config import ModelConfig
from .ops.contract import Int8DecodeOps, Mamba1Weights
from .ops.torch_ops import discretise, ssm_A
from .padding import Padding
from .quant import Projection, QuantizedWeight, linear
from .scales import LayerScales
from .state import MixerOutput

Tensor = torch.Tensor


class Mamba1Mixer(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        d, n, r = config.d_inner, config.d_state, config.dt_rank
        self.config = config
        self.backend = backend
        self.in_proj: Projection = nn.Linear(config.d_model, 2 * d, bias=config.proj_bias)  # -> x, z
        self.conv1d = nn.Conv1d(d, d, config.d_conv, groups=d, bias=config.conv_bias)  # weight (d, 1, k)
        self.x_proj: Projection = nn.Linear(d, r + 2 * n, bias=False)  # -> Δ (rank r), B, C
        self.dt_proj: Projection = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj: Projection = nn.Linear(d, config.d_model, bias=config.proj_bias)

    @property
    def dt_bias(self) -> Tensor:
        """dt_proj's bias: Δ = softplus(dt + dt_bias) (d,). dt_proj always has one."""
        bias = self.dt_proj.bias
        assert bias is not None
        return bias

    def _project(self, x: Tensor, layer: Projection, bias: Tensor | None = None) -> Tensor:
        """x @ W.T (+ bias) for x (b, l, in) -> (b, l, out), `layer` an nn.Linear or a quantised one. With a
        channels-first back-end the result is a (b, l, out) view of (b, out, l) storage, the layout its scan
        reads without copying; a short chunk's stays token-major (`Backend.channels_first`)."""
        if x.dim() != 3 or not self.backend.channels_first(x.shape[1]):
            return linear(x, layer, bias)
        out = torch.matmul(layer.weight, x.transpose(1, 2))  # (b, out, l)
        return (out if bias is None else out + bias[:, None]).transpose(1, 2)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., d) after the conv. Returns dt (..., d) before bias and softplus, B and C (..., n)."""
        r, n = self.config.dt_rank, self.config.d_state
        dt_low, B, C = torch.split(self._project(x, self.x_proj), [r, n, n], dim=-1)  # (..., r), (..., n), (..., n)
        return self._project(dt_low, self.dt_proj), B, C  # (..., d), (..., n), (..., n)

    def forward(self, hidden: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None,
                scales: LayerScales | None, return_delta: bool = False, padding: Padding | None = None) -> MixerOutput:
        """Prefill. hidden: (b, l, D); conv_state (b, d, k-1) and ssm_state (b, d, n) or None for zeros.
        With `return_delta` the output's Δ is (b, l, d) float32; with `padding`, rows padded on the right, each
        new state is its row's after its last real token."""
        ops = self.backend.ops
        x, z = self._project(hidden, self.in_proj, self.in_proj.bias).chunk(2, dim=-1)  # (b, l, d) each
        one_set = scales is not None and (x.shape[0] == 1 or scales.shared)  # every sequence scaled alike
        a_scale = None if scales is None or scales.a is None else scales.a[0] if one_set else scales.a
        A = ssm_A(self.A_log, a_scale)  # (d, n), or (b, d, n) for sets that differ
        delta_scale = None if scales is None else scales.delta  # (b, d): the scan discretises Δ itself
        conv_weight, conv_bias = self.conv1d.weight[:, 0], self.conv1d.bias  # (d, k), (d,)
        if scales is not None and delta_scale is not None and one_set:
            # One set: Δ' = s·Δ is exactly A' = s·A with input x' = s·x and skip D' = D/s (the state stays
            # h), so the scan runs unscaled, the kernels' fastest path; x' comes out of the convolution.
            x, scan_x, conv_state = ops.causal_conv1d_scaled(x, conv_weight, conv_bias, conv_state, delta_scale,
                                                             padding)
            (scan_A, scan_D), scan_scale = scales.folded(A, self.D), None
        else:
            x, conv_state = ops.causal_conv1d(x, conv_weight, conv_bias, conv_state, padding)  # (b, l, d)
            scan_x, scan_A, scan_D, scan_scale = x, A, self.D, delta_scale
        dt, B, C = self._ssm_inputs(x)
        out, ssm_state = ops.mamba1_scan(scan_x, dt, scan_A, B, C, scan_D, z, ssm_state, dt_bias=self.dt_bias,
                                         delta_scale=scan_scale, out_weight=self.out_proj.weight,
                                         out_bias=self.out_proj.bias, padding=padding)  # (b, l, D), (b, d, n)
        # the scan kernels discretise Δ internally and do not return it: recomputed when asked for
        delta = discretise(dt, self.dt_bias, delta_scale) if return_delta else None  # (b, l, d)
        return MixerOutput(out, (conv_state, ssm_state), delta)

    def step(self, projected: Tensor, conv_state: Tensor, ssm_state: Tensor, scales: LayerScales | None,
             slots: Tensor | None = None) -> Tensor:
        """Decode one token. projected: (b, in_proj rows), in_proj of the block's normed input (the model runs
        the two together); the states (b, ...), or with `slots` (b,) a pool's (whose row slots[i] is
        sequence i's), are updated in place. Returns (b, D)."""
        ops = self.backend.ops
        x, z = projected.chunk(2, dim=-1)  # (b, d) each
        conv_weight = self.conv1d.weight[:, 0]  # (d, k)
        delta_scale, a_scale = (None, None) if scales is None else (scales.delta, scales.a)  # (b, d), (b, d, n)
        x_proj, dt_proj = self.x_proj, self.dt_proj
        quantised = isinstance(x_proj, QuantizedWeight) or isinstance(dt_proj, QuantizedWeight)
        if isinstance(x_proj, QuantizedWeight) and isinstance(dt_proj, QuantizedWeight) and x_proj.bits == 8 \
                and dt_proj.bits == 8 and isinstance(ops, Int8DecodeOps):  # the step reads INT8 projections
            weights = Mamba1Weights(conv_weight, self.conv1d.bias, x_proj.qweight, dt_proj.qweight, self.dt_bias,
                                    self.A_log, self.D, x_proj.scale, dt_proj.scale)
            y = ops.mamba1_decode_int8(x, z, conv_state, ssm_state, weights, delta_scale=delta_scale,
                                       a_scale=a_scale, slots=slots)  # (b, d)
        elif quantised:
            # quantised projections go through their own kernels, so the step is composed of separate calls
            x = ops.causal_conv1d_step(x, conv_state, conv_weight, self.conv1d.bias, slots)  # (b, d)
            dt, B, C = self._ssm_inputs(x)
            y = ops.mamba1_step(ssm_state, x, dt, B, C, self.D, z, dt_bias=self.dt_bias, A_log=self.A_log,
                                delta_scale=delta_scale, a_scale=a_scale, slots=slots)  # (b, d)
        else:
            weights = Mamba1Weights(conv_weight, self.conv1d.bias, x_proj.weight, dt_proj.weight, self.dt_bias,
                                    self.A_log, self.D)
            y = ops.mamba1_decode(x, z, conv_state, ssm_state, weights, delta_scale=delta_scale, a_scale=a_scale,
                                  slots=slots)  # (b, d)
        return linear(y.to(projected.dtype), self.out_proj, self.out_proj.bias, ops)
