"""Prompt chunks of different lengths in one prefill batch, exactly: rows padded on the right.

A position whose Δ is 0 leaves a Mamba state as it was (exp(0·A) = 1 and Δ·B·x = 0), so a row padded on the right
ends in the state of its last real token when its dt is −∞ at the pad positions: softplus(−∞) = 0 exactly in every
back-end's discretisation (PyTorch's, mamba_ssm's kernel, the Triton kernels), and a Δ scale or an A-spectrum scale
keeps it 0. Mamba2 clamps Δ to `dt_limit` before any scale, so it pads exactly only where the limit's floor is 0.
The row's convolution state is the k−1 inputs before its end, gathered. Outputs at pad positions are never read.
Every back-end's convolution and scans take a `Padding` and honour it (`silence`, `conv_state`; the CUDA short-chunk
kernels stop each row at its end instead).
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
    ends: Tensor  # (b,) int64: each row's length, its real tokens (for kernels that stop each row at its own)
    pad: Tensor  # (b, l, 1) bool: the positions past a row's length
    state_at: Tensor  # (b, 1, k-1) int64: where each row's convolution state is in its state's inputs and then x's

    @classmethod
    def of(cls, lengths: list[int], device: torch.device, conv_width: int) -> Padding | None:
        """Rows of these lengths padded to the longest, for a convolution of `conv_width` taps; None where they are
        all that long (nothing to pad). Made once a step: every layer reads it."""
        longest = max(lengths)
        if min(lengths) == longest:
            return None
        return cls.at(to_device(lengths, device, torch.long), longest, conv_width)

    @classmethod
    def at(cls, ends: Tensor, width: int, conv_width: int) -> Padding:
        """Rows of lengths `ends` (b,) on the device, each at most `width`, padded to `width`: made on the device
        from the lengths alone (a captured graph's prefill makes it from its static lengths)."""
        pad = (torch.arange(width, device=ends.device)[None, :] >= ends[:, None])[..., None]  # (b, l, 1)
        # row i's last k-1 inputs end at x[ends[i] - 1], position k-2 + ends[i] of the state's and x's inputs
        state_at = (ends[:, None] + torch.arange(conv_width - 1, device=ends.device))[:, None, :]
        return cls(ends.contiguous(), pad, state_at)

    def silence(self, dt: Tensor) -> Tensor:
        """dt (b, l, c) before the bias and softplus, −∞ at the pad positions: Δ = 0 there."""
        return dt.masked_fill(self.pad, -torch.inf)

    def conv_state(self, x: Tensor, state: Tensor | None) -> Tensor:
        """The convolution state after each row's last real input: x (b, l, c) the convolution's input, state
        (b, c, k-1) the one it started from (None: zeros). Returns (b, c, k-1) in x's dtype."""
        b, _, c = x.shape
        k1 = self.state_at.shape[-1]  # k-1
        start = torch.zeros(b, c, k1, dtype=x.dtype, device=x.device) if state is None else state.to(x.dtype)
        inputs = torch.cat((start, x.transpose(1, 2)), dim=-1)  # (b, c, k-1+l): the state's, then x's
        return inputs.gather(-1, self.state_at.expand(b, c, k1))
