"""Scale sets (DESIGN.md §2): a positive factor on each layer's discretisation, exact in every path.

- `delta`: Δ' = s·Δ with Δ = softplus(dt_proj(x) + dt_bias); s per layer (scalar), per channel
  (Mamba1, d_inner) or per head (Mamba2, nheads).
- `a_spectrum`: A' = s·A only (the input gain ΔB is untouched); s per layer, per channel/head, or for
  Mamba1 per channel and state (d_inner, d_state).

A `ScaleSet` is what a bank stores for one bucket; `LayerScales` is what a mixer consumes: the sets of
one batch expanded to full resolution and stacked along the batch. `None` means identity and costs
nothing.

Shapes: b batch, d d_inner (Mamba1 channels), h nheads (Mamba2), n d_state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import MAMBA1, ModelConfig
from .errors import ScaleSetError
from .ops.torch_ops import fold_delta_scale


class ScaleMethod(str, enum.Enum):
    DELTA = "delta"
    A_SPECTRUM = "a_spectrum"


def granularity_of(shape: torch.Size, config: ModelConfig) -> str:
    """`layer`, `channel` (Mamba1) / `head` (Mamba2), or `channel_state` (Mamba1 a_spectrum)."""
    if shape == torch.Size([]):
        return "layer"
    if shape == torch.Size([config.scale_channels]):
        return "channel" if config.arch == MAMBA1 else "head"
    if config.arch == MAMBA1 and shape == torch.Size([config.d_inner, config.d_state]):
        return "channel_state"
    return "unknown"


@dataclass(frozen=True)
class ScaleSet:
    """One calibrated set of scales: a positive float32 tensor per layer, all of one method."""

    method: ScaleMethod
    layers: tuple[torch.Tensor, ...]  # per layer: (), (d,) / (h,), or (d, n) for Mamba1 a_spectrum

    @classmethod
    def identity(cls, config: ModelConfig, method: ScaleMethod, granularity: str = "layer") -> "ScaleSet":
        shape = {"layer": (), "channel": (config.scale_channels,), "head": (config.scale_channels,),
                 "channel_state": (config.d_inner, config.d_state)}[granularity]
        return cls(ScaleMethod(method), tuple(torch.ones(shape) for _ in range(config.n_layer)))

    def validate(self, config: ModelConfig, where: str = "scale set") -> None:
        """Raises ScaleSetError naming the layer when the set does not fit `config`."""
        if not isinstance(self.method, ScaleMethod):
            raise ScaleSetError(f"{where}: unknown method {self.method!r}")
        if len(self.layers) != config.n_layer:
            raise ScaleSetError(f"{where}: {len(self.layers)} layers, the model has {config.n_layer}")
        for i, scale in enumerate(self.layers):
            kind = granularity_of(scale.shape, config)
            if kind == "unknown" or (kind == "channel_state" and self.method is not ScaleMethod.A_SPECTRUM):
                raise ScaleSetError(f"{where}: layer {i} has shape {tuple(scale.shape)}, which fits no "
                                    f"{self.method.value} granularity of this {config.arch} model")
            if not torch.isfinite(scale).all() or not (scale > 0).all():
                raise ScaleSetError(f"{where}: layer {i} holds a non-positive or non-finite scale")

    @property
    def granularity(self) -> str:
        ndim = self.layers[0].dim()
        return ("layer", "channel", "channel_state")[ndim]


@dataclass
class LayerScales:
    """One layer's scales for a batch; a field is None when every sequence of the batch uses identity."""

    delta: torch.Tensor | None = None  # (b, d) Mamba1 / (b, h) Mamba2, float32
    a: torch.Tensor | None = None  # (b, d, n) Mamba1 / (b, h) Mamba2, float32
    # every sequence has the same set (a calibration batch): a Mamba1 prefill scans them with one A, as it
    # scans one sequence, instead of one sequence at a time
    shared: bool = False
    _folded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def folded(self, A: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch whose sequences share one Δ scale s = delta[0] (one sequence, or `shared`; Mamba1):
        (s·A, D/s); A (d, n), D (d,) -> float32. Kept after the first call (A and D are a frozen layer's),
        unless s is being calibrated."""
        if self._folded is not None:
            return self._folded
        s = self.delta[0]  # (d,)
        folded = fold_delta_scale(A, D, s)
        if not s.requires_grad:
            self._folded = folded
        return folded


BatchScales = list[LayerScales]  # one entry per layer


def _full_resolution(scale: torch.Tensor, method: ScaleMethod, config: ModelConfig) -> torch.Tensor:
    if method is ScaleMethod.A_SPECTRUM and config.arch == MAMBA1:
        return scale.reshape(scale.shape + (1,) * (2 - scale.dim())).expand(config.d_inner, config.d_state)
    return scale.expand(config.scale_channels)


def batch_scales(sets: Sequence[ScaleSet | None], config: ModelConfig, device: torch.device | str) -> BatchScales | None:
    """Stacks the sets of a batch (None = identity) per layer; None when the whole batch is identity."""
    if all(s is None for s in sets):
        return None
    shared = all(s is sets[0] for s in sets)
    out = []
    for layer in range(config.n_layer):
        fields = {}
        for method, name in ((ScaleMethod.DELTA, "delta"), (ScaleMethod.A_SPECTRUM, "a")):
            if not any(s is not None and s.method is method for s in sets):
                continue
            ones = torch.ones_like(_full_resolution(torch.ones(()), method, config))
            rows = [_full_resolution(s.layers[layer], method, config) if s is not None and s.method is method else ones
                    for s in sets]
            fields[name] = torch.stack(rows).to(device=device, dtype=torch.float32)
        out.append(LayerScales(**fields, shared=shared))
    return out
