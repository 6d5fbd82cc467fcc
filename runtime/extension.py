"""What extends one request past the model's training length: the scales of one method, a decimation, or
nothing. Bank selection (scale_bank.select) returns one; the model runner prepares it for the model.

Shapes are the parts' own: `ScaleSet` (runtime.scales) per layer, `Decimation` (runtime.decimation) none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decimation import Decimation
from .scales import ScaleSet

DECIMATE = "decimate"  # the method name of a decimation, beside ScaleMethod's


@dataclass(frozen=True, eq=False)
class Extension:
    """At most one of `scales` and `decimation`; neither is identity (`IDENTITY`). Compared and hashed by
    identity: a bank hands out one object per entry, which the runner keys its prepared scales by."""

    scales: ScaleSet | None = None  # applied in the prefill and every decode step
    decimation: Decimation | None = None  # drops prompt positions in the prefill, which then runs in one piece

    def __post_init__(self) -> None:
        if self.scales is not None and self.decimation is not None:
            raise ValueError("an extension either scales or decimates, not both")

    @property
    def method(self) -> str | None:
        """"delta", "a_spectrum", "decimate", or None for identity."""
        if self.scales is not None:
            return self.scales.method.value
        return DECIMATE if self.decimation is not None else None


IDENTITY = Extension()
