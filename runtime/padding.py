"""Prompt chunks of different lengths in one prefill batch, exactly: rows padded on the right.

A position whose Δ is 0 leaves a Mamba state as it was (exp(0·A) = 1 and Δ·B·x = 0), so a row padded on the right
ends in the state of its last real token when its dt is −∞ at the pad positions: softplus(−∞) = 0 exactly in every
back-end's discretisation (PyTorch's, mamba_ssm's kernel, the Triton kernels), and a Δ scale or an A-spectrum scale
keeps it 0. Mamba2 clamps Δ to `dt_limit` before any scale, so it pads exactly only where the limit's floor is 0.
The row's convolution state is the k−1 inputs before its end, gathered. Outputs at pad positions are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MAMBA2, ModelConfig
from .device_copy import to_device

Tensor = torch.Tensor


def pads_exactly(config: ModelConfig) -> bool:
    """Whether prompt chunks of different lengths may share a prefill batch (`Padding`)."""
    return config.arch != MAMBA2 or config.dt_limit[0] == 0


@dataclass(frozen=True)
class Padding:
    lengths: Tensor  # (b,) int64: each row's real tokens
    pad: Tensor  # (b, l, 1) bool: the positions past a row's length

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> Padding | None:
        """Rows of these lengths padded to the longest; None where they are all that long (nothing to pad)."""
        longest = max(lengths)
        if min(lengths) == longest:
            return None
        ends = to_device(lengths, device, torch.long)  # (b,)
        return cls(ends, (torch.arange(longest, device=device)[None, :] >= ends[:, None])[..., None])

    def silence(self, dt: Tensor) -> Tensor:
        """dt (b, l, c) before the bias and softplus, −∞ at the pad positions: Δ = 0 there."""
        return dt.masked_fill(self.pad, -torch.inf)

    def conv_state(self, x: Tensor, state: Tensor | None, k: int) -> Tensor:
        """The convolution state after each row's last real input: x (b, l, c) the convolution's input, state
        (b, c, k-1) the one it started from (None: zeros). Returns (b, c, k-1) in x's dtype."""
        b, _, c = x.shape
        start = torch.zeros(b, c, k - 1, dtype=x.dtype, device=x.device) if state is None else state.to(x.dtype)
        inputs = torch.cat((start, x.transpose(1, 2)), dim=-1)  # (b, c, k-1+l): the state's, then x's
        # row i's last k-1 inputs end at x[lengths[i] - 1], position k-2 + lengths[i] of `inputs`
        at = self.lengths[:, None] + torch.arange(k - 1, device=x.device)  # (b, k-1)
        return inputs.gather(-1, at[:, None, :].expand(b, c, k - 1))
