"""Round-to-nearest, symmetric, row-wise weight quantisation (QMambaExtend): INT8 and INT6.

Each output row r of a weight W (out, in) gets one float32 scale s_r = max|W_r| / q_max and integer values
q = round(W / s_r) in [-q_max, q_max] (q_max = 127 for INT8, 31 for INT6), so every element's error is at
most s_r / 2. Storage is real: INT8 as int8, INT6 packed four values in three bytes (uint8), plus the
float32 row scales. Compute dequantises one layer at a time (W ≈ q · s), in the layer's compute dtype;
the Δ-scale path is untouched (scales stay float32).

A product with few rows (a decode step) reads the int8 weights directly: on a GPU through a Triton kernel
(`ops.triton_int8`), on CPU through PyTorch's int8 weight-only kernel (`torch._weight_int8pack_mm`).
Dequantising first would read and write the weights in the compute dtype on every token, slower than the
unquantised model.

Quantised: the linear layers of the mixers (Mamba1 in_proj, x_proj, dt_proj, out_proj; Mamba2 in_proj,
out_proj) and optionally the embedding (which is also the LM head when tied).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import Self

if TYPE_CHECKING:
    from .model import MambaLM
    from .ops.contract import Ops

Q_MAX = {8: 127, 6: 31}
FUSED_MAX_ROWS = 64  # above this (prefill), dequantise once and use the dense matmul
# torch 2.13's CPU int8 kernel crashes (segmentation fault, nothing to catch) in bfloat16 when in_features is
# not a multiple of 8; narrower layers (Mamba1's dt_proj in small models) take the dequantising path.
FUSED_IN_MULTIPLE = 16
SCHEMES = {"int8": 8, "int6": 6}
LINEAR_NAMES = ("in_proj", "x_proj", "dt_proj", "out_proj")


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> q (out, in) int8 in [-q_max, q_max], scale (out,) float32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / Q_MAX[bits]  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-Q_MAX[bits], Q_MAX[bits]).to(torch.int8)
    return q, scale


def pack_int6(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8 in [-31, 31], in a multiple of 4 -> (out, 3·in/4) uint8: 4 values of 6 bits per 3 bytes."""
    u = (q.to(torch.int32) + 32).view(q.shape[0], -1, 4)  # (out, in/4, 4), each in [1, 63]
    word = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)  # (out, in/4), 24 bits
    packed = torch.stack((word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF), dim=-1)  # (out, in/4, 3)
    return packed.to(torch.uint8).view(q.shape[0], -1)


def unpack_int6(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int6`: (out, 3·in/4) uint8 -> (out, in) int8. Byte arithmetic only (no int32
    temporaries): it runs on every decode step."""
    b = packed.view(packed.shape[0], -1, 3)  # (out, in/4, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    u = torch.stack((b0 & 0x3F, (b0 >> 6) | ((b1 & 0x0F) << 2), (b1 >> 4) | ((b2 & 0x03) << 4), b2 >> 2), dim=-1)
    return (u.view(torch.int8) - 32).view(packed.shape[0], -1)  # each u in [1, 63]: the same as int8


@functools.cache
def _triton_int8() -> ModuleType | None:
    """The Triton kernel module, or None where Triton is not installed (it comes with CUDA builds of torch)."""
    try:
        from .ops import triton_int8
    except ImportError:
        return None
    return triton_int8


class QuantizedWeight(nn.Module):
    """A quantised (out, in) weight; `.weight` dequantises it to the compute dtype on every use."""

    qweight: torch.Tensor  # (out, in) int8, or (out, 3·in/4) uint8 packed INT6 (buffers, registered in __init__)
    scale: torch.Tensor  # (out,) float32

    def __init__(self, out_features: int, in_features: int, bits: int, dtype: torch.dtype):
        super().__init__()
        assert bits in Q_MAX, f"unsupported bits {bits}"
        assert bits == 8 or in_features % 4 == 0, "INT6 packs 4 values per 3 bytes: in_features % 4 must be 0"
        self.bits, self.in_features, self.compute_dtype = bits, in_features, dtype
        stored = (out_features, in_features) if bits == 8 else (out_features, in_features * 3 // 4)
        self.register_buffer("qweight", torch.zeros(stored, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self._fused: dict[tuple[str, torch.dtype], bool] = {}
        self._scales: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # `scale` cast once, not per token

    def set_from(self, weight: torch.Tensor) -> Self:
        q, scale = quantize_rows(weight, self.bits)
        self.qweight.copy_(q if self.bits == 8 else pack_int6(q))
        self.scale.copy_(scale)
        self._scales.clear()
        return self

    def _scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self.scale.device, dtype)
        if key not in self._scales:
            self._scales[key] = self.scale.to(dtype)
        return self._scales[key]

    def integers(self) -> torch.Tensor:
        return self.qweight if self.bits == 8 else unpack_int6(self.qweight)

    @property
    def weight(self) -> torch.Tensor:
        return self.integers().to(self.compute_dtype) * self._scale_as(self.compute_dtype)[:, None]  # (out, in)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) in the compute dtype -> x Wᵀ (+ bias): (..., out)."""
        rows = x.numel() // self.in_features
        differentiable = torch.is_grad_enabled() and x.requires_grad  # the int8 kernel has no backward
        if rows <= FUSED_MAX_ROWS and not differentiable:
            flat = x.reshape(rows, self.in_features).contiguous()  # (rows, in): the kernels assume dense rows
            kernels = _triton_int8() if self.bits == 8 and x.is_cuda else None
            if kernels is not None:
                product: torch.Tensor = kernels.int8_matmul(flat, self.qweight, self.scale, bias)  # (rows, out)
                return product.view(*x.shape[:-1], -1)
            if self.in_features % FUSED_IN_MULTIPLE == 0 and self._fused_kernel_works(x):
                out = torch._weight_int8pack_mm(flat, self.integers(), self._scale_as(x.dtype))
                out = out.view(*x.shape[:-1], -1)
                return out if bias is None else out + bias
        return F.linear(x, self.weight, bias)

    def _fused_kernel_works(self, x: torch.Tensor) -> bool:
        """Whether this PyTorch build has the int8 kernel for x's device and dtype (tried once per layer)."""
        key = (x.device.type, x.dtype)
        known = self._fused.get(key)
        if known is None:
            try:
                probe = x.reshape(-1, self.in_features)[:1].contiguous()
                torch._weight_int8pack_mm(probe, self.integers(), self._scale_as(x.dtype))
                known = True
            except (RuntimeError, NotImplementedError):
                known = False
            self._fused[key] = known
        return known

    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * 4


class QuantizedLinear(QuantizedWeight):
    """nn.Linear with a quantised weight (the bias, if any, stays in the compute dtype)."""

    def __init__(self, out_features: int, in_features: int, bits: int, dtype: torch.dtype, bias: bool):
        super().__init__(out_features, in_features, bits, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)


class QuantizedEmbedding(QuantizedWeight):
    """nn.Embedding with quantised rows: a lookup dequantises only the rows it reads."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids] if self.bits == 8 else unpack_int6(self.qweight[ids].flatten(0, -2)).view(
            *ids.shape, self.in_features)
        return (rows.float() * self.scale[ids][..., None]).to(self.compute_dtype)


def quantize_model(model: MambaLM, scheme: str, embedding: bool = False) -> None:
    """Replaces, in place, the mixers' linear layers (and the embedding if asked) by quantised ones."""
    bits = SCHEMES[scheme]
    for block in model.layers:
        for name in LINEAR_NAMES:
            linear = getattr(block.mixer, name, None)
            if linear is None:
                continue
            out_f, in_f = linear.weight.shape
            quantized = QuantizedLinear(out_f, in_f, bits, linear.weight.dtype, linear.bias is not None)
            quantized = quantized.to(linear.weight.device).set_from(linear.weight)
            if linear.bias is not None and quantized.bias is not None:
                quantized.bias.data.copy_(linear.bias.data)
            setattr(block.mixer, name, quantized)
    if embedding:
        table = model.embedding.weight
        model.embedding = QuantizedEmbedding(table.shape[0], table.shape[1], bits, table.dtype).to(
            table.device).set_from(table)
        if model.lm_head is not None:  # an untied head is the embedding's twin: quantised with it
            head = model.lm_head.weight
            model.lm_head = QuantizedLinear(head.shape[0], head.shape[1], bits, head.dtype, False).to(
                head.device).set_from(head)


Projection = nn.Linear | QuantizedLinear  # a mixer's linear layer, quantised or not


def linear(x: torch.Tensor, layer: Projection | nn.Embedding | QuantizedWeight, bias: torch.Tensor | None = None,
           ops: Ops | None = None) -> torch.Tensor:
    """x Wᵀ (+ bias) for an nn.Linear's or nn.Embedding's weight, or a quantised one: (..., in) -> (..., out).
    With a back-end's `ops`, a dense weight goes through its `linear` (a decode step's projection: on a GPU a
    GEMV kernel for a batch of a few); a quantised one always through its own kernels."""
    if isinstance(layer, QuantizedWeight):
        return layer.linear(x, bias)
    return F.linear(x, layer.weight, bias) if ops is None else ops.linear(x, layer.weight, bias)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy: parameters and the quantised buffers (float and integer)."""
    quantized = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return quantized + params
