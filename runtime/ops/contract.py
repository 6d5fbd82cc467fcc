"""The operator contract every back-end implements with the same signatures: `Ops`.

Implementations: `reference` (sequential, float64, slow and obviously correct: the twin tests hold the
others to), `torch_ops` (vectorised PyTorch; on CPU it runs the C kernels of `cpu_scan` and `cpu_decode`
where they apply), `cuda_ops` (mamba_ssm's kernels and the Triton kernels of `triton_ssm`, `triton_gemv`).
`triton_ssm`, `triton_mamba2`, `triton_gemv` and `cpu_decode` implement some of the operators, with these signatures
too.

Conventions shared by every back-end, so that the mixers need not know which one runs:
- Δ arrives raw (dt, before its bias): the operator discretises it, Δ = softplus(dt + dt_bias), clamped
  to `dt_limit` (Mamba2), times the per-sequence `delta_scale` when given, in float32;
- scans take A already negative and A-spectrum scaled, float32, shared `(d, n)` / `(h,)` or per sequence
  `(b, d, n)` / `(b, h)`; steps take A_log and the per-sequence `a_scale`;
- scale arguments are None for identity, and are named and placed alike in Mamba1's and Mamba2's operators;
- states are float32 (the convolution's in the model's dtype); prefill returns a new state, a step updates
  the state in place, in the rows `slots` (b,) int64 of a pool when given.

Shapes: b batch, l sequence, c conv channels, k conv width, d d_inner, n d_state, r dt_rank, h heads,
p head dim, g groups, D d_model (in add_rms_norm), N output rows of a projection; Mamba2's d = h·p and its
convolution runs over c = d + 2·g·n channels, [x (d), B (g·n), C (g·n)].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..padding import Padding

Tensor = torch.Tensor


@dataclass(frozen=True)
class Mamba1Weights:
    """A Mamba1 layer's weights between its input and output projections, as a decode step reads them."""

    conv_weight: Tensor  # (d, k)
    conv_bias: Tensor | None  # (d,)
    x_proj_weight: Tensor  # (r + 2n, d); int8 when x_proj_scale is given
    dt_proj_weight: Tensor  # (d, r); int8 when dt_proj_scale is given
    dt_bias: Tensor  # (d,)
    A_log: Tensor  # (d, n)
    D: Tensor  # (d,)
    x_proj_scale: Tensor | None = None  # (r + 2n,) float32 row scales of an int8 x_proj
    dt_proj_scale: Tensor | None = None  # (d,) float32 row scales of an int8 dt_proj

    def dequantised(self, dtype: torch.dtype) -> Mamba1Weights:
        """The weights with int8 projections multiplied out to `dtype`, as `QuantizedWeight.weight` does."""
        assert self.x_proj_scale is not None and self.dt_proj_scale is not None

        def weight(q: Tensor, scale: Tensor) -> Tensor:
            return q.to(dtype) * scale.to(dtype)[:, None]

        return Mamba1Weights(self.conv_weight, self.conv_bias, weight(self.x_proj_weight, self.x_proj_scale),
                             weight(self.dt_proj_weight, self.dt_proj_scale), self.dt_bias, self.A_log, self.D)


@dataclass(frozen=True)
class Mamba2Weights:
    """A Mamba2 layer's weights and settings between its input and output projections, as a decode step reads
    them."""

    conv_weight: Tensor  # (c, k)
    conv_bias: Tensor | None  # (c,)
    dt_bias: Tensor  # (h,)
    A_log: Tensor  # (h,)
    D: Tensor  # (h,)
    norm_weight: Tensor  # (d,) of the gated RMSNorm
    norm_eps: float
    ngroups: int  # g: groups of heads sharing B and C, and of channels the gated RMSNorm normalises together
    dt_limit: tuple[float, float]


class Ops(Protocol):
    """The operators of a back-end. Each docstring is the contract; `reference` is its literal reading."""

    def causal_conv1d(self, x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                      padding: Padding | None = None) -> tuple[Tensor, Tensor]:
        """Depth-wise causal convolution then SiLU. x (b, l, c); weight (c, k); bias (c,); state (b, c, k-1),
        the inputs before x, or None for zeros. Returns y (b, l, c) in x's dtype and the new state (b, c, k-1).
        With `padding` (rows padded on the right, `runtime.padding`) each row's new state is the k-1 inputs before
        its own end."""

    def causal_conv1d_scaled(self, x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
                             scale: Tensor, padding: Padding | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`causal_conv1d` and its output times a per-sequence channel scale (b, c) float32 (`scale_channels`):
        (y, y · scale, new state). The scan's input where one sequence's Δ scale is folded into it."""

    def causal_conv1d_step(self, x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None,
                           slots: Tensor | None = None) -> Tensor:
        """One token of `causal_conv1d`. x (b, c); state (b, c, k-1) or a pool's, updated in place.
        Returns (b, c) in the state's dtype."""

    def scale_channels(self, x: Tensor, scale: Tensor) -> Tensor:
        """x (b, l, d) times scale (b, d) float32 rounded to x's dtype. Returns (b, l, d) in x's dtype."""

    def mamba1_scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                    h0: Tensor | None, *, dt_bias: Tensor, delta_scale: Tensor | None, out_weight: Tensor,
                    out_bias: Tensor | None, padding: Padding | None = None) -> tuple[Tensor, Tensor]:
        """Mamba1's selective scan and its output projection. x, dt, z (b, l, d); A (d, n) or (b, d, n); B, C
        (b, l, n); D, dt_bias (d,); h0 (b, d, n) or None; delta_scale (b, d); out_weight (D, d).
        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = (C_t h_t + D x_t) · SiLU(z_t). Returns out_proj(y)
        (b, l, D) in out_weight's dtype and the last state (b, d, n) float32: with `padding`, each row's state
        after its last real token (the outputs at its pad positions are any finite values)."""

    def mamba1_step(self, h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None, *,
                    dt_bias: Tensor, A_log: Tensor, delta_scale: Tensor | None, a_scale: Tensor | None,
                    slots: Tensor | None = None) -> Tensor:
        """One token of `mamba1_scan` before the projection, A = −exp(A_log) · a_scale. h (b, d, n) or a pool's,
        updated in place; x, dt, z (b, d); B, C (b, n); A_log (d, n); a_scale (b, d, n). Returns y (b, d) in
        x's dtype."""

    def mamba1_decode(self, x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                      delta_scale: Tensor | None, a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
        """A Mamba1 decode step between the input and output projections: the convolution step, x_proj,
        dt_proj and `mamba1_step`. x, z (b, d) from in_proj; conv_state (b, d, k-1) and h (b, d, n), or
        pools, updated in place. Returns y (b, d) in the convolution state's dtype."""

    def mamba2_scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None, *,
                    dt_bias: Tensor, dt_limit: tuple[float, float], delta_scale: Tensor | None,
                    padding: Padding | None = None) -> tuple[Tensor, Tensor]:
        """Mamba2's SSD scan. x (b, l, h, p); dt (b, l, h); A (h,) or (b, h); B, C (b, l, g, n); D, dt_bias (h,);
        h0 (b, h, p, n) or None; delta_scale (b, h). Per head h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t ⊗ B_t,
        y_t = h_t C_t + D x_t. Returns y (b, l, h, p), float32 or (from a kernel that writes it so) in x's dtype,
        and the last state (b, h, p, n) float32; with `padding`, as `mamba1_scan`'s."""

    def mamba2_step(self, h: Tensor, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, *, dt_bias: Tensor,
                    dt_limit: tuple[float, float], A_log: Tensor, delta_scale: Tensor | None,
                    a_scale: Tensor | None, slots: Tensor | None = None) -> Tensor:
        """One token of `mamba2_scan`, A = −exp(A_log) · a_scale. h (b, h, p, n) or a pool's, updated in place;
        x (b, h, p); dt (b, h); B, C (b, g, n); A_log (h,); a_scale (b, h). Returns y (b, h, p) float32."""

    def gated_rms_norm(self, y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
        """Mamba2's output norm (mamba_ssm's norm_before_gate=False): v = y · SiLU(z), RMS-normalised over each of
        `groups` equal groups of its last dimension, times weight; float32 maths. y (..., d) in any float dtype
        (a scan's output); z (..., d); weight (d,). Returns (..., d) in z's dtype."""

    def mamba2_decode(self, xBC: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, h: Tensor,
                      weights: Mamba2Weights, *, delta_scale: Tensor | None, a_scale: Tensor | None,
                      slots: Tensor | None = None) -> Tensor:
        """A Mamba2 decode step between the input and output projections: the convolution step over xBC,
        `mamba2_step` and `gated_rms_norm`. xBC (b, c), z (b, d), dt (b, h) from in_proj; conv_state (b, c, k-1)
        and h (b, h, p, n), or pools, updated in place; delta_scale, a_scale (b, h). Returns (b, d) in z's
        dtype."""

    def add_rms_norm(self, residual: Tensor, update: Tensor | None, weight: Tensor, eps: float,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """residual (b, D) + update (b, D) (residual alone when None) in the residual's dtype, and its RMSNorm
        (float32 maths, weight (D,)) in `dtype`."""

    def add_rms_norm_linear(self, residual: Tensor, update: Tensor | None, norm_weight: Tensor, eps: float,
                            weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`add_rms_norm` (in weight's dtype) into a projection: the residual (b, D) and norm · weight (N, D)ᵀ
        + bias (b, N)."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (b, D) · weight (N, D)ᵀ + bias. Returns (b, N)."""


@runtime_checkable
class Int8DecodeOps(Protocol):
    """A back-end whose Mamba1 decode step reads int8 x_proj and dt_proj weights itself (`Mamba1Weights` with
    row scales); elsewhere quantised projections run through their own kernels around `mamba1_step`."""

    def mamba1_decode_int8(self, x: Tensor, z: Tensor, conv_state: Tensor, h: Tensor, weights: Mamba1Weights, *,
                           delta_scale: Tensor | None, a_scale: Tensor | None,
                           slots: Tensor | None = None) -> Tensor:
        """`Ops.mamba1_decode` with int8 projections."""
