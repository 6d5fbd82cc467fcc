"""Scale sets (docs/ARCHITECTURE.md, the scale maths): a positive factor on each layer's discretisation, exact
in every path.

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
from collections.abc import Sequence

import torch

from .config import MAMBA1, ModelConfig
from .errors import ScaleSetError
from .ops.torch_ops import fold_delta_scale


class ScaleMethod(str, enum.Enum):
    DELTA = "delta"
    A_SPECTRUM = "a_spectrum"


class Granularity(str, enum.Enum):
    """How finely a layer's scale resolves: its shape."""

    LAYER = "layer"  # ()
    CHANNEL = "channel"  # (d,): Mamba1
    HEAD = "head"  # (h,): Mamba2
    CHANNEL_STATE = "channel_state"  # (d, n): Mamba1, a_spectrum only


def granularities_of(arch: str) -> tuple[Granularity, ...]:
    """The granularities a model of `arch` has."""
    if arch == MAMBA1:
        return Granularity.LAYER, Granularity.CHANNEL, Granularity.CHANNEL_STATE
    return Granularity.LAYER, Granularity.HEAD


@dataclass(frozen=True)
class ScaleShapes:
    """The model dimensions a scale set is checked against: a ModelConfig's, or a bank's model record."""

    arch: str
    n_layer: int
    scale_channels: int  # d_inner (Mamba1) or nheads (Mamba2)
    d_inner: int
    d_state: int

    @classmethod
    def of(cls, config: ModelConfig) -> ScaleShapes:
        return cls(config.arch, config.n_layer, config.scale_channels, config.d_inner, config.d_state)

    def shape(self, granularity: Granularity) -> tuple[int, ...]:
        return {Granularity.LAYER: (), Granularity.CHANNEL: (self.scale_channels,),
                Granularity.HEAD: (self.scale_channels,),
                Granularity.CHANNEL_STATE: (self.d_inner, self.d_state)}[granularity]

    def granularity_of(self, shape: tuple[int, ...]) -> Granularity | None:
        """The granularity a scale of `shape` has in this model, or None when it has none."""
        for granularity in granularities_of(self.arch):
            if tuple(shape) == self.shape(granularity):
                return granularity
        return None


def check_scales(method: ScaleMethod, layers: Sequence[torch.Tensor], shapes: ScaleShapes,
                 granularity: Granularity | None = None) -> None:
    """Raises ScaleSetError naming the layer (`layers.<i>: …`) unless `layers` hold one positive, finite float32
    scale per layer of the model, all of one granularity of `method` (that one, when given)."""
    if len(layers) != shapes.n_layer:
        raise ScaleSetError(f"{len(layers)} layers, the model has {shapes.n_layer}")
    for i, scale in enumerate(layers):
        where = f"layers.{i}"
        if scale.dtype != torch.float32:
            raise ScaleSetError(f"{where}: dtype {scale.dtype}, expected torch.float32")
        found = shapes.granularity_of(tuple(scale.shape))
        if found is None or (found is Granularity.CHANNEL_STATE and method is not ScaleMethod.A_SPECTRUM):
            raise ScaleSetError(f"{where}: shape {tuple(scale.shape)} is {'unknown' if found is None else found.value} "
                                f"granularity, which no {method.value} scale of this {shapes.arch} model has")
        granularity = granularity or found
        if found is not granularity:
            raise ScaleSetError(f"{where}: shape {tuple(scale.shape)} is {found.value} granularity for this "
                                f"{shapes.arch} model, expected {granularity.value}")
        if not torch.isfinite(scale).all():
            raise ScaleSetError(f"{where}: non-finite scale (NaN or Inf)")
        if not (scale > 0).all():
            raise ScaleSetError(f"{where}: non-positive scale (min {scale.min().item():g})")


@dataclass(frozen=True, eq=False)
class ScaleSet:
    """One calibrated set of scales: a positive float32 tensor per layer, all of one method and granularity."""

    method: ScaleMethod
    layers: tuple[torch.Tensor, ...]  # per layer: (), (d,) / (h,), or (d, n) for Mamba1 a_spectrum

    @classmethod
    def identity(cls, config: ModelConfig, method: ScaleMethod, granularity: Granularity | str = "layer") -> ScaleSet:
        shape = ScaleShapes.of(config).shape(Granularity(granularity))
        return cls(ScaleMethod(method), tuple(torch.ones(shape) for _ in range(config.n_layer)))

    def validate(self, config: ModelConfig, where: str = "scale set") -> None:
        """Raises ScaleSetError naming `where` and the layer when the set does not fit `config`."""
        if not isinstance(self.method, ScaleMethod):
            raise ScaleSetError(f"{where}: unknown method {self.method!r}")
        try:
            check_scales(self.method, self.layers, ScaleShapes.of(config))
        except ScaleSetError as fault:
            raise ScaleSetError(f"{where}: {fault}") from None

    def granularity(self, config: ModelConfig) -> Granularity | None:
        """The granularity of the set's layers in `config`'s model (None when they fit none)."""
        return ScaleShapes.of(config).granularity_of(tuple(self.layers[0].shape))


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
        assert self.delta is not None, "folded for a batch with a Δ scale"
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


def batch_scales(sets: Sequence[ScaleSet | None], config: ModelConfig,
                 device: torch.device | str) -> BatchScales | None:
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
        out.append(LayerScales(fields.get("delta"), fields.get("a"), shared))
    return out
