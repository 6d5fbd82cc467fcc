"""Random scale sets of both methods for a model's config, for the tests that run a batch with scales."""

from __future__ import annotations

import torch

from runtime import ScaleMethod, ScaleSet


def delta_and_a_scales(config, seed: int = 0) -> tuple[ScaleSet, ScaleSet]:
    """A per-channel (Mamba2: per-head) Δ set and a per-layer A-spectrum set, each scale in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    delta = ScaleSet(ScaleMethod.DELTA, tuple(torch.rand(config.scale_channels, generator=g) + 0.5
                                              for _ in range(config.n_layer)))
    a = ScaleSet(ScaleMethod.A_SPECTRUM, tuple(torch.rand((), generator=g) + 0.5 for _ in range(config.n_layer)))
    return delta, a
