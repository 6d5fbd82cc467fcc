"""Round-to-nearest, symmetric, row-wise weight quantisation (QMambaExtend): INT8 and INT6.

Each output row r of a weight W (out, in) gets one float32 scale s_r = max|W_r| / q_max and integer values
q = round(W / s_r) in [-q_max, q_max] (q_max = 127 for INT8, 31 for INT6), so every element's error is at
most s_r / 2. Storage is real: INT8 as int8, INT6 packed four values in three bytes (uint8), plus the
float32 row scales. Compute dequantises one layer at a time (W ≈ q · s), in the layer's compute dtype;
the Δ-scale path is untouched (scales stay float32).

Quantised: the linear layers of the mixers (Mamba1 in_proj, x_proj, dt_proj, out_proj; Mamba2 in_proj,
out_proj) and optionally the embedding (which is also the LM head when tied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Q_MAX = {8: 127, 6: 31}
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
    """Inverse of `pack_int6`: (out, 3·in/4) uint8 -> (out, in) int8."""
    b = packed.to(torch.int32).view(packed.shape[0], -1, 3)  # (out, in/4, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (out, in/4)
    u = torch.stack([(word >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=-1)  # (out, in/4, 4)
    return (u - 32).to(torch.int8).view(packed.shape[0], -1)


class QuantizedWeight(nn.Module):
    """A quantised (out, in) weight; `.weight` dequantises it to the compute dtype on every use."""

    def __init__(self, out_features: int, in_features: int, bits: int, dtype: torch.dtype):
        super().__init__()
        assert bits in Q_MAX, f"unsupported bits {bits}"
        assert bits == 8 or in_features % 4 == 0, "INT6 packs 4 values per 3 bytes: in_features % 4 must be 0"
        self.bits, self.in_features, self.compute_dtype = bits, in_features, dtype
        stored = (out_features, in_features) if bits == 8 else (out_features, in_features * 3 // 4)
        self.register_buffer("qweight", torch.zeros(stored, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))

    def set_from(self, weight: torch.Tensor) -> "QuantizedWeight":
        q, scale = quantize_rows(weight, self.bits)
        self.qweight.copy_(q if self.bits == 8 else pack_int6(q))
        self.scale.copy_(scale)
        return self

    def integers(self) -> torch.Tensor:
        return self.qweight if self.bits == 8 else unpack_int6(self.qweight)

    @property
    def weight(self) -> torch.Tensor:
        return (self.integers().float() * self.scale[:, None]).to(self.compute_dtype)  # (out, in)

    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * 4


class QuantizedLinear(QuantizedWeight):
    """nn.Linear with a quantised weight (the bias, if any, stays in the compute dtype)."""

    def __init__(self, out_features: int, in_features: int, bits: int, dtype: torch.dtype, bias: bool):
        super().__init__(out_features, in_features, bits, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantizedEmbedding(QuantizedWeight):
    """nn.Embedding with quantised rows: a lookup dequantises only the rows it reads."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids] if self.bits == 8 else unpack_int6(self.qweight[ids].flatten(0, -2)).view(
            *ids.shape, self.in_features)
        return (rows.float() * self.scale[ids][..., None]).to(self.compute_dtype)


def quantize_model(model: nn.Module, scheme: str, embedding: bool = False) -> None:
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
            if linear.bias is not None:
                quantized.bias.data.copy_(linear.bias.data)
            setattr(block.mixer, name, quantized)
    if embedding:
        table = model.embedding.weight
        model.embedding = QuantizedEmbedding(*table.shape, bits, table.dtype).to(table.device).set_from(table)
        if model.lm_head is not None:  # an untied head is the embedding's twin: quantised with it
            head = model.lm_head.weight
            model.lm_head = QuantizedLinear(*head.shape, bits, head.dtype, False).to(head.device).set_from(head)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy: parameters and the quantised buffers (float and integer)."""
    quantized = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return quantized + params
